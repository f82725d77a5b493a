"""Tests of the synthetic MNI152 pairs (napari_discreg.core.data.template)."""

from __future__ import annotations

import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from napari_discreg.core.config import DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.data.template import (
    CONTRASTS,
    TISSUES,
    Pair,
    fixed_test_pairs,
    load_template,
    make_pair,
    random_field,
    sample_batch,
    synthesize_contrast,
)
from napari_discreg.core.registration.preprocess import normalise_intensity
from napari_discreg.core.registration.warp import jacobian_determinant, warp_numpy

SIZE = 64
SLICE = 80  # an axial slice through the lateral ventricles


@pytest.fixture(scope="module")
def template():
    return load_template(SIZE)


@pytest.fixture(scope="module")
def config():
    return DataConfig(size=SIZE)


# --------------------------------------------------------------------------- template


def test_template_arrays(template):
    assert load_template(SIZE) is template  # cached
    shape = (189, SIZE, SIZE)
    for name in ("t1", "gm", "wm", "csf", "mask"):
        arr = getattr(template, name)
        assert arr.shape == shape and arr.dtype == np.float32, name
        assert arr.min() >= 0.0 and arr.max() <= 1.0, name
        assert not arr.flags.writeable, name
    assert template.labels.shape == shape and template.labels.dtype == np.uint8
    assert template.n_slices == 189 and template.size == SIZE
    assert template.t1.max() == pytest.approx(1.0)
    assert set(np.unique(template.mask)) == {0.0, 1.0}
    outside = template.mask == 0
    for name in ("t1", "gm", "wm", "csf"):
        assert np.all(getattr(template, name)[outside] == 0), name
    np.testing.assert_allclose(
        template.csf, np.clip(template.mask - template.gm - template.wm, 0, 1), atol=1e-6
    )
    assert set(np.unique(template.labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(template.labels > 0, template.mask > 0)
    # labels are the argmax tissue inside the mask
    inside = template.mask[SLICE] > 0
    stack = np.stack([template.tissue(t)[SLICE] for t in TISSUES])
    np.testing.assert_array_equal(template.labels[SLICE][inside], (np.argmax(stack, 0) + 1)[inside])
    assert template.pixel_mm > 1.0  # 64 px cover about 190 mm


def test_template_orientation(template):
    # low slices hold the cerebellum, which is posterior: the brain's centre of
    # mass lies below the image centre when anterior is up
    rows = np.nonzero(template.mask[30])[0]
    assert rows.mean() > (SIZE - 1) / 2 + 2
    # the template is nearly left-right symmetric about the central column
    mask = template.mask[SLICE]
    assert np.mean(mask == mask[:, ::-1]) > 0.95


def test_slice_ranges_disjoint_and_hold_brain(template):
    cfg = DataConfig()
    (a, b), (c, d) = cfg.train_slices, cfg.test_slices
    assert 0 <= a < b <= c < d <= template.n_slices  # disjoint, test above train
    for index in (a, b - 1, c, d - 1):
        assert template.mask[index].mean() > 0.1, index
    # the whole volume's brain ends well above the test range
    assert template.mask[155:].sum() == 0


def test_no_network_needed(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    volumes = data._read_volumes.__wrapped__()  # bypass the cache: read the files again
    assert volumes["t1"].shape == (197, 233, 189)
    small = data._build_template(16)
    assert small.t1.shape == (189, 16, 16)


# --------------------------------------------------------------------------- intensities


def test_normalise_intensity_basic():
    rng = np.random.default_rng(0)
    image = np.zeros((32, 32), dtype=np.float64)
    image[8:24, 8:24] = rng.uniform(10.0, 20.0, size=(16, 16))
    before = image.copy()
    out = normalise_intensity(image)
    np.testing.assert_array_equal(image, before)  # input untouched
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[image == 0] == 0)  # background stays at zero
    fg = out[8:24, 8:24]
    assert fg.min() > 0.3  # tissue stays brighter than background
    assert np.mean(fg == 1.0) == pytest.approx(0.01, abs=0.01)  # top 1 % saturate
    # a mask selects the foreground explicitly and gives the same result here
    np.testing.assert_allclose(normalise_intensity(image, mask=image > 0), out, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_normalise_intensity_constant_is_zero(value):
    with np.errstate(all="raise"):
        out = normalise_intensity(np.full((8, 9), value))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, 0.0)


def test_normalise_intensity_nonfinite_and_binary():
    image = np.linspace(0.0, 1.0, 100).reshape(10, 10)
    image[0, 0] = np.nan
    image[0, 1] = np.inf
    out = normalise_intensity(image)
    assert np.all(np.isfinite(out)) and out[0, 0] == 0 and out[0, 1] == 0
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(normalise_intensity(np.full((4, 4), np.nan)), 0.0)
    binary = np.zeros((8, 8))
    binary[2:5, 2:5] = 1.0
    np.testing.assert_array_equal(normalise_intensity(binary), binary)


def test_synthesize_contrast_shapes_and_determinism(template, config):
    for contrast in CONTRASTS:
        a = synthesize_contrast(template, SLICE, contrast, np.random.default_rng(3), config)
        b = synthesize_contrast(template, SLICE, contrast, np.random.default_rng(3), config)
        c = synthesize_contrast(template, SLICE, contrast, np.random.default_rng(4), config)
        assert a.shape == (SIZE, SIZE) and a.dtype == np.float32
        assert a.min() >= 0.0 and a.max() <= 1.0
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="contrast"):
        synthesize_contrast(template, SLICE, "flair", np.random.default_rng(0), config)
    with pytest.raises(IndexError):
        synthesize_contrast(template, 189, "t1", np.random.default_rng(0), config)


def _tissue_means(image, labels):
    return np.array([image[labels == k].mean() for k in range(4)])


def test_synthetic_contrasts_are_not_monotone_in_t1(template, config):
    labels = template.labels[SLICE]
    brain = template.mask[SLICE] > 0
    rng = np.random.default_rng(0)
    images = {c: synthesize_contrast(template, SLICE, c, rng, config) for c in CONTRASTS}
    order_t1 = np.argsort(_tissue_means(images["t1"], labels))
    np.testing.assert_array_equal(order_t1, [0, 1, 2, 3])  # bg < CSF < GM < WM
    means_t2 = _tissue_means(images["t2"], labels)
    means_pd = _tissue_means(images["pd"], labels)
    assert means_t2[1] > means_t2[2] > means_t2[3] > means_t2[0]  # CSF > GM > WM > bg
    assert means_pd[2] > means_pd[1] > means_pd[3] > means_pd[0]  # GM > CSF > WM > bg
    for contrast in ("t2", "pd"):
        order = np.argsort(_tissue_means(images[contrast], labels))
        assert not np.array_equal(order, order_t1)
        assert not np.array_equal(order, order_t1[::-1])
        rho = spearmanr(images["t1"].ravel(), images[contrast].ravel())[0]
        assert abs(rho) < 0.85, (contrast, rho)
    # PD is not even monotone inside the brain
    rho_brain = spearmanr(images["t1"][brain], images["pd"][brain])[0]
    assert abs(rho_brain) < 0.8
    # the synthetic contrasts are not piecewise flat: they keep some fine texture
    wm = (template.wm[SLICE] > 0.95) & brain
    clean = replace(config, noise=0.0, bias=0.0, blur=0.0)
    t2 = synthesize_contrast(template, SLICE, "t2", rng, clean)
    assert t2[wm].std() > 0.005


# --------------------------------------------------------------------------- deformations


def test_random_field_magnitude_and_smoothness():
    for seed in range(8):
        rng = np.random.default_rng(seed)
        u = random_field((96, 80), rng, max_displacement=5.0, smoothness=10.0, affine_scale=0.03)
        assert u.shape == (2, 96, 80) and u.dtype == np.float32
        largest = np.sqrt((u**2).sum(0)).max()
        assert 2.5 - 1e-4 <= largest <= 5.0 + 1e-4
        assert jacobian_determinant(u).min() > 0.2  # smooth, no folding
    a = random_field((32, 32), np.random.default_rng(1), max_displacement=3.0)
    b = random_field((32, 32), np.random.default_rng(1), max_displacement=3.0)
    np.testing.assert_array_equal(a, b)
    zero = random_field((16, 16), np.random.default_rng(0), max_displacement=0.0)
    np.testing.assert_array_equal(zero, 0.0)


def test_make_pair_semantics(template):
    cfg = DataConfig(size=SIZE, noise=0.0)
    pair = make_pair(template, SLICE, "t1", "t2", np.random.default_rng(7), cfg)
    rng = np.random.default_rng(7)
    img_a = synthesize_contrast(template, SLICE, "t1", rng, cfg)
    img_b = synthesize_contrast(template, SLICE, "t2", rng, cfg)
    u = random_field(
        (SIZE, SIZE),
        rng,
        max_displacement=cfg.max_displacement,
        smoothness=cfg.smoothness,
        affine_scale=cfg.affine_scale,
    )
    assert isinstance(pair, Pair) and pair.index == SLICE
    assert (pair.fixed_contrast, pair.moving_contrast) == ("t1", "t2")
    np.testing.assert_array_equal(pair.displacement, u)
    np.testing.assert_array_equal(pair.moving, img_b)
    np.testing.assert_allclose(pair.fixed, warp_numpy(img_a, u), atol=1e-6)

    # with noise, the fixed image is the warped noise-free image plus fresh noise
    noisy = make_pair(template, SLICE, "t1", "t2", np.random.default_rng(7), DataConfig(size=SIZE))
    np.testing.assert_array_equal(noisy.displacement, u)
    residual = (noisy.fixed - pair.fixed)[pair.mask > 0]
    assert 0.02 < residual.std() < 0.04


def test_registration_convention(template):
    # without bias and noise both T1 images are identical, so warping the moving
    # image with the true field reproduces the fixed image exactly
    cfg = DataConfig(size=SIZE, noise=0.0, bias=0.0)
    pair = make_pair(template, SLICE, "t1", "t1", np.random.default_rng(2), cfg)
    np.testing.assert_allclose(warp_numpy(pair.moving, pair.displacement), pair.fixed, atol=1e-5)
    assert np.abs(pair.moving - pair.fixed).mean() > 0.01  # the field does move things


def test_make_pair_labels_and_mask(template, config):
    for seed, contrasts in enumerate([("t1", "t1"), ("t1", "t2"), ("pd", "t1")]):
        pair = make_pair(template, 60 + seed, *contrasts, np.random.default_rng(seed), config)
        for name in ("fixed", "moving", "mask"):
            arr = getattr(pair, name)
            assert arr.shape == (SIZE, SIZE) and arr.dtype == np.float32, name
        assert pair.fixed.min() >= 0 and pair.fixed.max() <= 1
        assert pair.fixed_labels.dtype == np.uint8 and pair.moving_labels.dtype == np.uint8
        np.testing.assert_array_equal(pair.moving_labels, template.labels[pair.index])
        np.testing.assert_array_equal(
            pair.fixed_labels, warp_numpy(pair.moving_labels, pair.displacement, order=0)
        )
        np.testing.assert_array_equal(
            pair.mask, warp_numpy(np.array(template.mask[pair.index]), pair.displacement, order=0)
        )
        np.testing.assert_array_equal(pair.mask > 0, pair.fixed_labels > 0)


def test_same_seed_same_field_for_every_contrast(template, config):
    kwargs = {"n": 3, "seed": 5, "fixed_contrast": "t1"}
    t2 = fixed_test_pairs(template, config, moving_contrast="t2", **kwargs)
    pd = fixed_test_pairs(template, config, moving_contrast="pd", **kwargs)
    for a, b in zip(t2, pd, strict=True):
        np.testing.assert_array_equal(a.displacement, b.displacement)
        np.testing.assert_array_equal(a.fixed, b.fixed)
        assert a.index == b.index


# --------------------------------------------------------------------------- batches


def test_sample_batch(template, config):
    batch = sample_batch(
        template, "train", 4, np.random.default_rng(0), config, pairs=(("t1", "t1"), ("t1", "pd"))
    )
    assert set(batch) == {
        "fixed",
        "moving",
        "displacement",
        "mask",
        "fixed_labels",
        "moving_labels",
    }
    for key in ("fixed", "moving", "mask"):
        assert batch[key].shape == (4, 1, SIZE, SIZE) and batch[key].dtype == torch.float32
    assert batch["displacement"].shape == (4, 2, SIZE, SIZE)
    assert batch["displacement"].dtype == torch.float32
    for key in ("fixed_labels", "moving_labels"):
        assert batch[key].shape == (4, 1, SIZE, SIZE) and batch[key].dtype == torch.int64
        assert int(batch[key].min()) >= 0 and int(batch[key].max()) <= 3
    assert float(batch["fixed"].min()) >= 0 and float(batch["fixed"].max()) <= 1
    again = sample_batch(
        template, "train", 4, np.random.default_rng(0), config, pairs=(("t1", "t1"), ("t1", "pd"))
    )
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    with pytest.raises(ValueError, match="split"):
        sample_batch(template, "val", 2, np.random.default_rng(0), config)
    with pytest.raises(ValueError, match="config.size"):
        sample_batch(template, "train", 2, np.random.default_rng(0), DataConfig(size=SIZE * 2))
    with pytest.raises(ValueError, match="contrast"):
        sample_batch(template, "train", 2, np.random.default_rng(0), config, pairs=(("t1", "x"),))


def test_sample_batch_draws_from_the_split(template, monkeypatch):
    cfg = DataConfig(size=SIZE, train_slices=(40, 42), test_slices=(100, 101))
    seen = []
    original = data.make_pair

    def spy(template, index, *args):
        seen.append(index)
        return original(template, index, *args)

    monkeypatch.setattr(data, "make_pair", spy)
    sample_batch(template, "train", 6, np.random.default_rng(0), cfg)
    assert set(seen) <= {40, 41}
    seen.clear()
    sample_batch(template, "test", 2, np.random.default_rng(0), cfg)
    assert seen == [100, 100]


def test_fixed_test_pairs(template, config):
    lo, hi = config.test_slices
    pairs = fixed_test_pairs(
        template, config, n=4, fixed_contrast="t1", moving_contrast="t2", seed=0
    )
    again = fixed_test_pairs(
        template, config, n=4, fixed_contrast="t1", moving_contrast="t2", seed=0
    )
    assert len(pairs) == 4
    indices = [p.index for p in pairs]
    assert all(lo <= i < hi for i in indices) and len(set(indices)) == 4
    for a, b in zip(pairs, again, strict=True):
        np.testing.assert_array_equal(a.fixed, b.fixed)
        np.testing.assert_array_equal(a.moving, b.moving)
        np.testing.assert_array_equal(a.displacement, b.displacement)
    other = fixed_test_pairs(
        template, config, n=1, fixed_contrast="t1", moving_contrast="t2", seed=1
    )
    assert not np.array_equal(other[0].displacement, pairs[0].displacement)
    short = DataConfig(size=SIZE, test_slices=(100, 102))
    cycled = fixed_test_pairs(
        template, short, n=5, fixed_contrast="t1", moving_contrast="t1", seed=0
    )
    assert [p.index for p in cycled] == [100, 101, 100, 101, 100]
