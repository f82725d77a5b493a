"""Control-point positions, field sampling and inversion (core.registration.geometry, no Qt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_discreg.core.registration.geometry import (
    control_grid_shape,
    control_point_index,
    control_point_position,
    control_point_positions,
    deformation_grid,
    displacement_vectors,
    fixed_to_moving,
    in_plane_axes,
    insert_axis,
    moving_to_fixed,
    sample_field,
)
from napari_discreg.core.registration.register import NetworkOutputs, RegistrationResult


def _smooth_field(shape=(40, 48), amplitude=2.0):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    field = np.stack([amplitude * np.sin(cols / 9.0), amplitude * np.cos(rows / 11.0)])
    return field.astype(np.float32)


def test_control_point_position_and_index_are_inverse():
    stride, grid = 4, (10, 12)
    assert control_point_position(0, 0, stride) == (1.5, 1.5)
    assert control_point_position(1, 2, stride) == (5.5, 9.5)
    for i, j in [(0, 0), (3, 7), (9, 11)]:
        row, col = control_point_position(i, j, stride)
        assert control_point_index(row, col, stride, grid) == (i, j)
        # every pixel of the block belongs to its control point
        assert control_point_index(i * stride, j * stride + stride - 1, stride, grid) == (i, j)
    assert control_point_index(-3.0, 1000.0, stride, grid) == (0, 11)  # clipped to the grid


def test_control_point_positions_cover_the_image():
    assert control_grid_shape((37, 50), 4) == (10, 13)
    pts = control_point_positions((37, 50), 4)
    # the last blocks are partial: their centres (row 37.5, col 49.5) lie outside the image
    assert pts.shape == (9 * 12, 2)
    np.testing.assert_array_equal(pts[0], control_point_position(0, 0, 4))
    np.testing.assert_array_equal(pts[1], control_point_position(0, 1, 4))
    assert (pts[:, 0] <= 36).all() and (pts[:, 1] <= 49).all()
    assert control_point_positions((37, 50), 4, step=3).shape == (3 * 4, 2)


def test_registration_result_uses_the_same_control_points():
    k = 5
    network = NetworkOutputs(None, None, None)
    network.set(torch.full((2, 1, 10, 12, k, k), 1.0 / k**2))  # both heads uniform
    result = RegistrationResult(
        displacement=np.zeros((2, 40, 48), np.float32),
        warped=np.zeros((40, 48), np.float32),
        offsets=np.linspace(-2, 2, k, dtype=np.float32),
        stride=4,
        _network=network,
    )
    assert result.discrepancy.shape == (10, 12)
    assert result.control_point_position(3, 7) == control_point_position(3, 7, 4)
    assert result.control_point(13.2, 29.9) == control_point_index(13.2, 29.9, 4, (10, 12))


def test_sample_field_is_bilinear_and_clamps_at_the_border():
    field = np.zeros((2, 3, 3), np.float32)
    field[0] = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    field[1] = 1.0
    out = sample_field(field, [[0.5, 0.5], [1.0, 2.0], [-4.0, 10.0]])
    np.testing.assert_allclose(out, [[2.0, 1.0], [5.0, 1.0], [2.0, 1.0]])
    assert sample_field(field, np.zeros((0, 2))).shape == (0, 2)


def test_moving_to_fixed_inverts_fixed_to_moving():
    field = _smooth_field()
    pts = np.array([[10.0, 12.0], [20.5, 31.0], [35.0, 5.0]])
    fixed, residual = moving_to_fixed(pts, field)
    assert residual < 1e-2
    np.testing.assert_allclose(fixed_to_moving(fixed, field), pts, atol=1e-2)
    empty, res = moving_to_fixed(np.zeros((0, 2)), field)
    assert empty.shape == (0, 2) and res == 0.0


def test_moving_to_fixed_inverts_a_strong_smooth_stretch():
    # u_col = 1.5 * (col - 32) * g(row, col): a smooth, one-to-one map (J > 0 everywhere)
    # whose local stretch makes the fixed-point iteration x <- y - u(x) diverge
    rr, cc = np.mgrid[0:64, 0:64].astype(np.float64)
    g = np.exp(-((rr - 32) ** 2 + (cc - 32) ** 2) / (2 * 10.0**2))
    field = np.stack([np.zeros_like(g), 1.5 * (cc - 32) * g]).astype(np.float32)
    from napari_discreg.core.registration.warp import jacobian_determinant

    assert jacobian_determinant(field).min() > 0
    pts = np.stack(np.meshgrid(np.arange(4.0, 60, 4), np.arange(4.0, 60, 4)), -1).reshape(-1, 2)
    x, residual = moving_to_fixed(pts, field)
    assert residual < 1e-2, residual
    np.testing.assert_allclose(fixed_to_moving(x, field), pts, atol=1e-2)


def test_vectors_and_deformation_grid():
    field = _smooth_field()
    vec = displacement_vectors(field, 4, step=2)
    starts = control_point_positions(field.shape[-2:], 4, step=2)
    np.testing.assert_array_equal(vec[:, 0], starts)
    np.testing.assert_allclose(vec[:, 1], sample_field(field, starts))
    segments, residual = deformation_grid(field, spacing=8)
    assert segments.shape[1:] == (2, 2) and residual < 1e-2
    # with no motion the grid is the regular grid itself
    flat, _ = deformation_grid(np.zeros_like(field), spacing=8)
    assert set(np.unique(flat[:, 0, 0][flat[:, 1, 0] == 0])) <= set(np.arange(0.0, 40.0, 2.0))


@pytest.mark.parametrize(
    ("ndim", "axis", "plane"), [(2, None, [0, 1]), (3, 0, [1, 2]), (3, 1, [0, 2])]
)
def test_axis_helpers(ndim, axis, plane):
    assert in_plane_axes(ndim, axis) == plane
    pts = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = insert_axis(pts, axis, 7.0)
    if axis is None:
        assert out is pts
    else:
        np.testing.assert_array_equal(out[:, axis], [7.0, 7.0])
        np.testing.assert_array_equal(out[:, plane], pts)
