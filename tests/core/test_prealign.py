"""Pre-alignment: known affines recovered across contrasts, the full circle of rotations,
no invented motion, other sizes and spacings, colour, and the ITK export."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_discreg.core.config import DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files.itk_field import itk_affine_text
from napari_discreg.core.registration.prealign import (
    bright_background,
    describe_affine,
    prealign,
    resample,
    tissue_image,
    to_gray,
    unmoved_matrix,
)


def _affine(angle_deg: float, scale: float, shift, centre) -> np.ndarray:
    """Pixel map fixed -> moving: rotate and scale about ``centre``, then shift."""
    t = math.radians(angle_deg)
    lin = scale * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    out = np.eye(3)
    out[:2, :2] = lin
    out[:2, 2] = np.asarray(centre) + np.asarray(shift) - lin @ np.asarray(centre)
    return out


@pytest.fixture(scope="module")
def slices():
    """T1 fixed and T2-like moving of one held-out slice, 128 px, no deformation."""
    cfg = DataConfig(size=128)
    template = data.load_template(cfg.size)
    rng = np.random.default_rng(0)
    t1 = data.synthesize_contrast(template, 100, "t1", rng, cfg)
    t2 = data.synthesize_contrast(template, 100, "t2", rng, cfg)
    return t1, t2


def _error_px(found: np.ndarray, truth: np.ndarray, shape) -> float:
    """Largest distance between the two maps over the central part of the image."""
    h, w = shape
    rr, cc = np.meshgrid(np.linspace(h * 0.2, h * 0.8, 7), np.linspace(w * 0.2, w * 0.8, 7))
    pts = np.stack([rr.ravel(), cc.ravel(), np.ones(rr.size)])
    return float(np.linalg.norm((found - truth)[:2] @ pts, axis=0).max())


@pytest.mark.parametrize(
    "angle, scale, shift",
    [(25.0, 1.0, (6.0, -9.0)), (-30.0, 1.12, (-10.0, 4.0)), (180.0, 0.9, (3.0, 3.0))],
)
def test_a_known_affine_is_recovered_across_contrasts(slices, angle, scale, shift):
    t1, t2 = slices
    truth = _affine(angle, scale, shift, (63.5, 63.5))
    # moving = T2-like image seen through the inverse map, so that fixed(x) ~ moving(A x)
    moving = resample(t2, np.linalg.inv(truth), t2.shape)
    found = prealign(t1, moving, "affine")
    assert _error_px(found, truth, t1.shape) < 1.5, describe_affine(found)


def test_rigid_mode_keeps_the_scale(slices):
    t1, t2 = slices
    truth = _affine(40.0, 1.0, (5.0, 0.0), (63.5, 63.5))
    found = prealign(t1, resample(t2, np.linalg.inv(truth), t2.shape), "rigid")
    sv = np.linalg.svd(found[:2, :2], compute_uv=False)
    np.testing.assert_allclose(sv, 1.0, atol=1e-5)
    assert _error_px(found, truth, t1.shape) < 1.5


def test_an_unmoved_multimodal_pair_gets_exactly_no_motion(slices):
    t1, t2 = slices
    for mode in ("affine", "similarity", "rigid"):
        np.testing.assert_array_equal(prealign(t1, t2, mode), np.eye(3))


def test_none_maps_pixels_at_the_same_physical_position():
    a = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    found = prealign(a, a[::2, ::2], "none", fixed_spacing=(1, 1), moving_spacing=(2, 2))
    np.testing.assert_allclose(found, np.diag([0.5, 0.5, 1.0]))
    np.testing.assert_allclose(unmoved_matrix((0.5, 1.0), (1.0, 1.0)), np.diag([0.5, 1.0, 1.0]))


def test_spacing_is_physical_not_pixels(slices):
    """A moving image at half the resolution (spacing 2) of the same anatomy: the map is
    the spacing ratio, not a 2x stretch of the tissue."""
    t1, t2 = slices
    small = t2[::2, ::2].copy()
    found = prealign(t1, small, "affine", moving_spacing=(2.0, 2.0))
    assert _error_px(found, np.diag([0.5, 0.5, 1.0]), t1.shape) < 1.0


def test_bad_settings_are_clear_errors(slices):
    t1, t2 = slices
    with pytest.raises(ValueError, match="unknown pre-alignment"):
        prealign(t1, t2, "projective")
    with pytest.raises(ValueError, match="fixed_spacing must be two positive"):
        prealign(t1, t2, "rigid", fixed_spacing=(0.0, 1.0))


def test_colour_and_bright_backgrounds():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 255
    assert to_gray(rgb).shape == (32, 32)
    np.testing.assert_allclose(to_gray(rgb), 0.2125 * 255, rtol=1e-5)
    slide = np.full((64, 64), 240.0, np.float32)  # white glass around dark tissue
    slide[16:48, 16:48] = 80.0
    assert bright_background(slide)
    assert tissue_image(slide)[0, 0] == 0 and tissue_image(slide)[32, 32] > 0
    mri = 240.0 - slide
    assert not bright_background(mri)
    np.testing.assert_array_equal(tissue_image(mri), mri)


def test_itk_affine_file_maps_points_as_the_pixel_map():
    sitk = pytest.importorskip("SimpleITK")
    import tempfile
    from pathlib import Path

    a = _affine(12.0, 1.05, (3.0, -2.0), (20.0, 30.0))
    sf, sm = (0.5, 0.8), (0.7, 0.9)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "affine.tfm"
        path.write_text(itk_affine_text(a, fixed_spacing=sf, moving_spacing=sm))
        tf = sitk.ReadTransform(str(path))
    for r, c in [(0.0, 0.0), (10.0, 40.0), (33.0, 7.5)]:
        x, y = tf.TransformPoint((c * sf[1], r * sf[0]))  # ITK: (x, y) physical
        q = a @ np.array([r, c, 1.0])
        np.testing.assert_allclose([y / sm[0], x / sm[1]], q[:2], atol=1e-9)


def test_the_foreground_blur_stays_small_on_a_long_strip():
    """The blur is a 256th of the long side, at most a quarter of the short one: the
    same for every image up to an aspect ratio of 64 (before: a 256 px kernel on a
    65536 x 16 strip, seconds of work for a 16 px wide image)."""
    from unittest import mock

    from napari_discreg.core.registration import prealign as pre

    seen = []
    with mock.patch("scipy.ndimage.gaussian_filter", side_effect=lambda a, s: seen.append(s) or a):
        pre.foreground(np.ones((65536, 16), np.float32))
        pre.foreground(np.ones((448, 369), np.float32))
    assert seen == [4.0, 448 / 256]
