"""The npe2 sample-data contributions, opened through napari as a user would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from napari.layers import Image, Labels

from napari_discreg.core.registration.warp import warp_numpy


def test_multimodal_pair_sample(viewer):
    viewer.open_sample("napari-discreg", "multimodal_pair")
    fixed, moving = viewer.layers["fixed (T1)"], viewer.layers["moving (T2-like)"]
    labels = viewer.layers["fixed tissue labels"]
    assert isinstance(fixed, Image) and isinstance(moving, Image) and isinstance(labels, Labels)
    assert fixed.data.shape == moving.data.shape == labels.data.shape == (192, 192)
    assert set(np.unique(labels.data)) <= {0, 1, 2, 3} and labels.data.max() == 3
    truth = moving.metadata["true_displacement"]
    assert truth.shape == (2, 192, 192)
    # the stored field is the one that aligns moving with fixed: warping the moving
    # tissue labels with it gives the fixed tissue labels (nearest neighbour)
    warped = warp_numpy(viewer.layers["moving tissue labels"].data, truth, order=0)
    assert (warped == labels.data).mean() > 0.98


def test_adaptation_target_set_sample(viewer):
    viewer.open_sample("napari-discreg", "adaptation_target_set")
    fixed, moving = viewer.layers["target fixed (T1)"], viewer.layers["target moving (T2-like)"]
    assert fixed.data.shape == moving.data.shape == (8, 192, 192)
    assert moving.metadata["true_displacement"].shape == (8, 2, 192, 192)
    # eight different slices, all with brain in them
    assert len(set(fixed.metadata["slice_indices"])) == 8
    assert all(fixed.data[i].std() > 0.05 and moving.data[i].std() > 0.05 for i in range(8))


def test_histology_pair_sample_with_landmarks(viewer):
    from napari.layers import Points

    from napari_discreg._sample_data import HISTOLOGY_FIXED, SAMPLES

    viewer.open_sample("napari-discreg", "histology_pair")
    fixed, moving = viewer.layers["fixed (HE)"], viewer.layers["moving (proSPC)"]
    assert isinstance(fixed, Image) and fixed.rgb and fixed.data.shape == (733, 890, 3)
    assert isinstance(moving, Image) and moving.rgb and moving.data.shape == (735, 891, 3)
    assert fixed.data.dtype == np.uint8
    fixed_pts = viewer.layers["fixed (HE) landmarks"]
    moving_pts = viewer.layers["moving (proSPC) landmarks"]
    assert isinstance(fixed_pts, Points) and isinstance(moving_pts, Points)
    assert len(fixed_pts.data) == len(moving_pts.data) == 78
    # (row, col): the CSV's first landmark is X=59 (column), Y=72 (row)
    np.testing.assert_array_equal(fixed_pts.data[0], [72, 59])
    np.testing.assert_array_equal(fixed_pts.features["landmark"], np.arange(1, 79))
    np.testing.assert_array_equal(moving_pts.features["landmark"], np.arange(1, 79))
    for layer, image in ((fixed_pts, fixed), (moving_pts, moving)):  # inside their image
        assert (layer.data >= 0).all() and (layer.data < image.data.shape[:2]).all()
    # the images are the original JPEGs, unchanged, with the licence and the source
    shared = Path("/work/shared/data/histology/lung-lesion") / f"{HISTOLOGY_FIXED}.jpg"
    if shared.is_file():
        assert (SAMPLES / f"{HISTOLOGY_FIXED}.jpg").read_bytes() == shared.read_bytes()
    assert "BSD" in (SAMPLES / "README.md").read_text() + (SAMPLES / "LICENSE").read_text()
    assert "Borovec" in (SAMPLES / "README.md").read_text()


def test_the_samples_are_package_data():
    """Every file in samples/ is matched by pyproject's package-data (so wheels ship it)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import napari_discreg
    from napari_discreg._sample_data import SAMPLES

    root = Path(napari_discreg.__file__).parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():  # an installed wheel: the files are there or not
        assert any(SAMPLES.glob("*.jpg"))
        return
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"][
        "napari_discreg"
    ]
    files = [p.relative_to(SAMPLES.parent).as_posix() for p in SAMPLES.iterdir()]
    assert len(files) >= 6
    for name in files:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), name
