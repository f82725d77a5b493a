"""Geometry of control points and displacement fields (NumPy and SciPy; no Qt, no napari).

Control points. The network predicts one displacement histogram per ``stride x stride``
block of pixels; control point ``(i, j)`` sits at the centre of its block, at pixel
``((i + 0.5) * stride - 0.5, (j + 0.5) * stride - 0.5)``
(:func:`control_point_coordinate`, the one place this formula is written), and pixel
``(row, col)`` belongs to the control point :func:`control_point_index` returns.

Fields (the convention of :mod:`napari_discreg.core.registration.warp`): a field ``u`` of shape
``(2, H, W)`` maps a pixel ``x`` of the *fixed* image to ``x + u(x)`` in the *moving*
image, and ``warped(x) = moving(x + u(x))``. Hence

* a point given in the fixed frame lands at ``x + u(x)`` in the moving image
  (:func:`fixed_to_moving`, exact);
* a point ``y`` given in the moving frame lands where ``x + u(x) = y``; that needs the
  inverse map, found by Newton's method (:func:`moving_to_fixed`). It converges wherever
  the map is one-to-one (no folding); the residual ``|x + u(x) - y|`` is returned so
  callers can tell where it is not.

Points are ``(n, 2)`` arrays of (row, col) pixel coordinates; Vectors data are
``(n, 2, 2)`` arrays of (start, vector), as napari's Vectors layers take them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "control_point_coordinate",
    "control_point_position",
    "control_point_index",
    "control_grid_shape",
    "control_point_positions",
    "sample_field",
    "fixed_to_moving",
    "moving_to_fixed",
    "displacement_vectors",
    "grid_polylines",
    "deformation_grid",
    "insert_axis",
    "in_plane_axes",
]


# ----------------------------------------------------------------------- control points


def control_point_coordinate(index, stride: int):
    """Pixel coordinate of control point ``index`` along one axis (scalar or array)."""
    return (np.asarray(index, dtype=np.float64) + 0.5) * stride - 0.5


def control_point_position(i: int, j: int, stride: int) -> tuple[float, float]:
    """Pixel coordinates ``(row, col)`` of control point ``(i, j)``."""
    return float(control_point_coordinate(i, stride)), float(control_point_coordinate(j, stride))


def control_point_index(
    row: float, col: float, stride: int, grid_shape: tuple[int, int]
) -> tuple[int, int]:
    """Index ``(i, j)`` of the control point whose block holds pixel ``(row, col)``.

    The inverse of :func:`control_point_position` (blocks run from ``i * stride - 0.5``
    to ``(i + 1) * stride - 0.5``); pixels beyond the grid ``(h, w)`` give the nearest
    control point on its border.
    """
    h, w = grid_shape
    i = int(np.clip(np.floor((row + 0.5) / stride), 0, h - 1))
    j = int(np.clip(np.floor((col + 0.5) / stride), 0, w - 1))
    return i, j


def control_grid_shape(shape_hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Number of control points ``(h, w)`` of an ``(H, W)`` image: ``ceil(H / stride)`` ..."""
    return int(np.ceil(shape_hw[0] / stride)), int(np.ceil(shape_hw[1] / stride))


def control_point_positions(shape_hw: tuple[int, int], stride: int, step: int = 1) -> np.ndarray:
    """Pixel positions ``(n, 2)`` of every ``step``-th control point inside an ``(H, W)`` image.

    Row-major order (control point ``(0, 0)``, ``(0, step)``, ...); control points of the
    last, partial block whose centre lies beyond the image are left out.
    """
    h, w = control_grid_shape(shape_hw, stride)
    rows = control_point_coordinate(np.arange(0, h, step), stride)
    cols = control_point_coordinate(np.arange(0, w, step), stride)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    pts = np.stack([rr.ravel(), cc.ravel()], axis=1)
    inside = (pts[:, 0] <= shape_hw[0] - 1) & (pts[:, 1] <= shape_hw[1] - 1)
    return pts[inside]


# ----------------------------------------------------------------------------- fields


def sample_field(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear samples ``(n, 2)`` of a ``(2, H, W)`` field at ``points`` ``(n, 2)`` (row, col).

    Points outside the image take the value of the nearest border pixel, as the warp does.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] == 0:
        return np.zeros((0, 2))
    coords = pts.T
    return np.stack(
        [
            ndi.map_coordinates(np.asarray(c, np.float64), coords, order=1, mode="nearest")
            for c in field
        ],
        axis=1,
    )


def fixed_to_moving(points: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Map fixed-frame points to the moving frame: ``x + u(x)``."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts + sample_field(field, pts)


def moving_to_fixed(
    points: np.ndarray, field: np.ndarray, *, iterations: int = 50, tol: float = 1e-3
) -> tuple[np.ndarray, float]:
    """Map moving-frame points to the fixed frame by inverting ``x -> x + u(x)``.

    Newton's method on ``x + u(x) = y`` from ``x = y - u(y)``, with the map's Jacobian
    ``I + grad u`` sampled at ``x`` and steps capped at 2 px. (The plain fixed-point
    iteration ``x <- y - u(x)`` diverges wherever the field stretches by more than its own
    size, ``|du/dx| > 1``, although the map is invertible there; Newton's method
    converges for every smooth one-to-one field.) Returns the points and the largest
    residual ``|x + u(x) - y|`` in pixels: above a fraction of a pixel only where the field
    folds (the map is not one-to-one, Jacobian determinant <= 0).
    """
    y = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if y.shape[0] == 0:
        return y.copy(), 0.0
    u = np.asarray(field, dtype=np.float64)
    grads = [np.gradient(u[a]) for a in range(2)]  # grads[a][b] = d u_a / d x_b
    x = y - sample_field(u, y)
    for _ in range(iterations):
        r = x + sample_field(u, x) - y
        if np.abs(r).max() < tol:
            break
        coords = x.T
        jac = np.empty((x.shape[0], 2, 2))
        for a in range(2):
            for b in range(2):
                g = ndi.map_coordinates(grads[a][b], coords, order=1, mode="nearest")
                jac[:, a, b] = g + (1.0 if a == b else 0.0)
        det = jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]
        ok = np.abs(det) > 1e-6
        step = r.copy()  # where the Jacobian is singular: a fixed-point step
        inv = np.stack(
            [
                np.stack([jac[:, 1, 1], -jac[:, 0, 1]], axis=1),
                np.stack([-jac[:, 1, 0], jac[:, 0, 0]], axis=1),
            ],
            axis=1,
        )
        newton = np.einsum("nab,nb->na", inv, r) / np.where(ok, det, 1.0)[:, None]
        step[ok] = newton[ok]
        norm = np.linalg.norm(step, axis=1, keepdims=True)
        x = x - step * np.minimum(1.0, 2.0 / np.maximum(norm, 1e-12))
    residual = np.linalg.norm(x + sample_field(u, x) - y, axis=1).max()
    return x, float(residual)


def displacement_vectors(field: np.ndarray, stride: int, step: int = 1) -> np.ndarray:
    """Vectors data ``(n, 2, 2)``: at each control point ``x``, the arrow ``x -> x + u(x)``."""
    pts = control_point_positions(field.shape[-2:], stride, step)
    return np.stack([pts, sample_field(field, pts)], axis=1)


def grid_polylines(
    shape: tuple[int, int], spacing: float, resolution: float = 2.0
) -> list[np.ndarray]:
    """Lines of a regular grid over an ``(H, W)`` image, each a ``(m, 2)`` array of vertices."""
    h, w = shape
    spacing = max(float(spacing), 1.0)
    resolution = max(min(float(resolution), spacing), 0.5)
    rows_at = np.arange(0.0, h, spacing)
    cols_at = np.arange(0.0, w, spacing)
    along_c = np.append(np.arange(0.0, w - 1, resolution), w - 1)
    along_r = np.append(np.arange(0.0, h - 1, resolution), h - 1)
    lines = [np.stack([np.full_like(along_c, r), along_c], axis=1) for r in rows_at]
    lines += [np.stack([along_r, np.full_like(along_r, c)], axis=1) for c in cols_at]
    return lines


def deformation_grid(field: np.ndarray, spacing: float = 8.0) -> tuple[np.ndarray, float]:
    """A regular grid of the moving image warped like the image, as Vectors line segments.

    Each vertex ``y`` of the moving-frame grid is drawn at its fixed-frame position
    (:func:`moving_to_fixed`), so the grid overlays the fixed and the warped image and
    shows how the moving image was deformed. Returns ``(n, 2, 2)`` Vectors data
    (segment start, segment vector) and the inversion residual in pixels.
    """
    lines = grid_polylines(field.shape[-2:], spacing)
    lengths = [len(line) for line in lines]
    mapped, residual = moving_to_fixed(np.concatenate(lines), field)
    segments = []
    start = 0
    for n in lengths:
        v = mapped[start : start + n]
        start += n
        segments.append(np.stack([v[:-1], np.diff(v, axis=0)], axis=1))
    return np.concatenate(segments), residual


# ------------------------------------------------------------------------ volume axes


def insert_axis(points: np.ndarray, axis: int | None, value: float) -> np.ndarray:
    """Insert a coordinate column ``value`` at ``axis`` into ``(..., 2)`` in-plane coordinates."""
    if axis is None:
        return points
    pts = np.asarray(points, dtype=np.float64)
    col = np.full(pts.shape[:-1] + (1,), float(value))
    return np.concatenate([pts[..., :axis], col, pts[..., axis:]], axis=-1)


def in_plane_axes(ndim: int, axis: int | None) -> list[int]:
    """The two axes of an ``ndim``-D array that form the registered 2D plane."""
    if axis is None:
        return [ndim - 2, ndim - 1]
    return [a for a in range(ndim) if a != axis]
