"""Conventions: label grid, quantisation, soft labels, warping, upsampling, Jacobian."""

import numpy as np
import pytest
import torch
from skimage.transform import warp as sk_warp

from napari_discreg.core.registration.label_grid import (
    argmax_label,
    expected_displacement,
    label_offsets,
    label_to_displacement,
    quantise,
    soft_labels,
)
from napari_discreg.core.registration.warp import (
    control_point_field,
    jacobian_determinant,
    upsample_field,
    warp,
    warp_numpy,
)

K, Q = 15, 7.0


def test_offsets_symmetric_with_zero():
    off = label_offsets(K, Q)
    assert off.shape == (K,)
    assert off[K // 2] == 0
    torch.testing.assert_close(off, -off.flip(0))
    assert float(off[1] - off[0]) == pytest.approx(1.0)


def test_quantise_round_trip_on_bin_centres():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, K * K, size=(2, 5, 6)))
    field = label_to_displacement(labels, K, Q)
    assert torch.equal(quantise(field, K, Q), labels)


def test_quantise_picks_nearest_bin_and_clamps():
    field = torch.tensor([[[[0.4]], [[-0.6]]]])  # row 0.4 -> bin 7, col -0.6 -> bin 6
    assert int(quantise(field, K, Q)) == 7 * K + 6
    far = torch.tensor([[[[100.0]], [[-100.0]]]])
    assert int(quantise(far, K, Q)) == (K - 1) * K + 0


def test_soft_labels_are_histograms_with_exact_expectation():
    rng = np.random.default_rng(1)
    field = torch.from_numpy(rng.uniform(-Q, Q, size=(3, 2, 4, 5)).astype(np.float32))
    soft = soft_labels(field, K, Q)
    assert soft.shape == (3, 4, 5, K, K)
    torch.testing.assert_close(soft.sum((-1, -2)), torch.ones(3, 4, 5))
    assert (soft >= 0).all()
    torch.testing.assert_close(
        expected_displacement(soft, label_offsets(K, Q)), field, atol=1e-5, rtol=0
    )
    # at most 4 non-zero bins, and the argmax is the quantised label
    assert int((soft > 0).flatten(-2).sum(-1).max()) <= 4
    assert torch.equal(argmax_label(soft), quantise(field, K, Q))


def test_warp_matches_skimage_warp():
    rng = np.random.default_rng(2)
    img = rng.random((40, 50)).astype(np.float32)
    disp = rng.normal(0, 2.0, size=(2, 40, 50)).astype(np.float32)
    rr, cc = np.meshgrid(np.arange(40), np.arange(50), indexing="ij")
    expected = sk_warp(img, np.stack([rr + disp[0], cc + disp[1]]), order=1, mode="edge")
    np.testing.assert_allclose(warp_numpy(img, disp), expected, atol=1e-3)


def test_zero_field_is_identity_and_integer_shift_moves_pixels():
    img = torch.arange(64.0).reshape(1, 1, 8, 8)
    assert torch.allclose(warp(img, torch.zeros(1, 2, 8, 8)), img)
    shift = torch.zeros(1, 2, 8, 8)
    shift[:, 1] = 2.0  # warped(r, c) = moving(r, c + 2)
    out = warp(img, shift)
    assert torch.allclose(out[..., :6], img[..., 2:])


def test_warp_nearest_keeps_label_values():
    labels = np.random.default_rng(3).integers(0, 4, size=(20, 20)).astype(np.uint8)
    disp = np.full((2, 20, 20), 0.3, np.float32)
    out = warp_numpy(labels, disp, order=0)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1, 2, 3}


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_upsampled_affine_field_is_exact_and_downsampling_inverts_it(stride):
    h, w = 6, 5
    ii, jj = torch.meshgrid(torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij")
    r = (ii + 0.5) * stride - 0.5
    c = (jj + 0.5) * stride - 0.5
    cp = torch.stack([0.1 * r + 0.05 * c + 1, -0.07 * c + 0.5])[None]  # linear in pixel coords
    dense = upsample_field(cp, stride)
    assert dense.shape == (1, 2, h * stride, w * stride)
    rr, cc = torch.meshgrid(
        torch.arange(h * stride * 1.0), torch.arange(w * stride * 1.0), indexing="ij"
    )
    truth = torch.stack([0.1 * rr + 0.05 * cc + 1, -0.07 * cc + 0.5])[None]
    inner = (slice(None), slice(None), slice(stride, -stride), slice(stride, -stride))
    torch.testing.assert_close(dense[inner], truth[inner], atol=1e-5, rtol=0)
    torch.testing.assert_close(control_point_field(truth, stride), cp, atol=1e-5, rtol=0)


def test_jacobian_identity_and_folding():
    assert np.allclose(jacobian_determinant(np.zeros((2, 10, 10))), 1.0)
    rr = np.arange(10.0)[:, None] * np.ones((1, 10))
    fold = np.stack([-2.0 * rr, np.zeros((10, 10))])  # x -> x - 2x along rows flips orientation
    assert (jacobian_determinant(fold) <= 0).all()


def test_warp_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B, 2, H, W"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="same spatial size"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 5, 4))
