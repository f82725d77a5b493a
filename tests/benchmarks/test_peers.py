"""Tests of the classical peers (_peers): elastix and SimpleITK.

The key test is the convention one: a known translation must come back with the
right sign and axis order, in the convention of napari_discreg.core.registration.warp.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import _peers as peers
import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_discreg.core.config import DataConfig
from napari_discreg.core.data.template import load_template, make_pair
from napari_discreg.core.registration.metrics import end_point_error
from napari_discreg.core.registration.warp import warp_numpy

# ITK's SWIG wrappers trigger these on Python 3.11+; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:builtin type .* has no __module__ attribute:DeprecationWarning"
)


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (elastix loads slowly)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


needs_peer = {
    "elastix": pytest.mark.skipif(
        not _installed("itk.ElastixPython"), reason="itk-elastix is not installed"
    ),
    "simpleitk": pytest.mark.skipif(
        not _installed("SimpleITK"), reason="SimpleITK is not installed"
    ),
}
PEER_PARAMS = [pytest.param(name, marks=needs_peer[name]) for name in peers.PEERS]

# small, quick settings for 64-96 px images
FAST = {
    "elastix": {"iterations": 100, "resolutions": 2},
    "simpleitk": {"iterations": 50, "resolutions": 2, "mesh_size": 4},
}

TRUE_SHIFT = (2.0, -1.0)  # (row, col) pixels


@pytest.fixture(scope="module")
def shifted():
    """A smooth random image and its copy with fixed(r, c) = moving(r + 2, c - 1)."""
    rng = np.random.default_rng(0)
    image = ndi.gaussian_filter(rng.standard_normal((64, 64)), 3.0)
    moving = ((image - image.min()) / (image.max() - image.min())).astype(np.float32)
    truth = np.empty((2, 64, 64), np.float32)
    truth[0], truth[1] = TRUE_SHIFT
    fixed = warp_numpy(moving, truth)
    return fixed, moving, truth


@pytest.fixture(scope="module")
def t1_t2_pair():
    config = DataConfig(size=96)
    return make_pair(load_template(96), 100, "t1", "t2", np.random.default_rng(3), config)


@pytest.mark.parametrize("name", PEER_PARAMS)
def test_peer_recovers_a_translation_with_our_sign_and_axes(name, shifted, tmp_path, monkeypatch):
    fixed, moving, truth = shifted
    monkeypatch.chdir(tmp_path)
    field = peers.PEERS[name](fixed, moving, **FAST[name])
    assert not list(tmp_path.iterdir()), "a peer left files in the working directory"
    assert field.shape == (2, 64, 64) and field.dtype == np.float32
    inner = (slice(12, -12), slice(12, -12))
    epe = float(np.sqrt(((field - truth) ** 2).sum(0))[inner].mean())
    assert epe < 0.5, f"{name}: interior EPE {epe:.3f} px"
    # row component first (+2), column second (-1): a swap or a sign flip fails here
    mean = field[(slice(None), *inner)].reshape(2, -1).mean(1)
    np.testing.assert_allclose(mean, TRUE_SHIFT, atol=0.3)
    # and the field warps moving onto fixed with our warp
    before = np.abs(moving - fixed)[inner].mean()
    after = np.abs(warp_numpy(moving, field) - fixed)[inner].mean()
    assert after < 0.25 * before, f"{name}: |warped - fixed| {after:.4f} vs {before:.4f}"


@pytest.mark.parametrize("name", PEER_PARAMS)
def test_peer_improves_a_t1_t2_pair(name, t1_t2_pair):
    pair = t1_t2_pair
    field = peers.PEERS[name](pair.fixed, pair.moving, **FAST[name])
    identity = end_point_error(np.zeros_like(pair.displacement), pair.displacement, pair.mask)
    epe = end_point_error(field, pair.displacement, pair.mask)
    print(f"{name}: T1-T2 96 px EPE {epe:.3f} px (identity {identity:.3f} px)")
    assert epe < 0.7 * identity


@pytest.mark.parametrize("name", PEER_PARAMS)
def test_peer_is_deterministic_for_a_seed(name, shifted):
    fixed, moving, _ = shifted
    options = {**FAST[name], "iterations": 20, "threads": 1}
    if name == "simpleitk":
        options["sampling"] = 0.3  # the random-sampling path (the default samples every pixel)
    first = peers.PEERS[name](fixed, moving, seed=5, **options)
    second = peers.PEERS[name](fixed, moving, seed=5, **options)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", list(peers.PEERS))
def test_peer_rejects_bad_inputs(name):
    image = np.zeros((32, 32), np.float32)
    fn = peers.PEERS[name]
    with pytest.raises(ValueError, match="same shape"):
        fn(image, np.zeros((32, 30), np.float32))
    with pytest.raises(ValueError, match="2D"):
        fn(np.zeros((2, 32, 32), np.float32), np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match="finite"):
        fn(np.full((32, 32), np.nan, np.float32), image)
    with pytest.raises(ValueError, match="iterations"):
        fn(image, image, iterations=0)


@pytest.mark.parametrize(("name", "module"), [("elastix", "itk"), ("simpleitk", "SimpleITK")])
def test_missing_toolkit_says_how_to_install(name, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    image = np.zeros((32, 32), np.float32)
    with pytest.raises(ImportError, match=r"napari-discreg\[peers\]"):
        peers.PEERS[name](image, image)


def test_importing_peers_loads_no_toolkit():
    benchmarks = str(Path(__file__).resolve().parents[2] / "benchmarks")
    code = (
        f"import sys; sys.path.insert(0, {benchmarks!r}); import napari_discreg.core, _peers; "
        "bad = [m for m in ('itk', 'SimpleITK') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
