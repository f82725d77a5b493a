"""Evaluation metrics (docs/method.md, "Metrics"). NumPy in, Python floats out."""

from __future__ import annotations

import numpy as np

from .warp import jacobian_determinant


def _mask(mask, shape) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask) > 0
    if m.shape != tuple(shape):
        raise ValueError(f"mask {m.shape} does not match the field {tuple(shape)}")
    return m


def end_point_error(predicted, truth, mask=None) -> float:
    """Mean Euclidean distance (px) between two (2, H, W) fields over ``mask``."""
    p, t = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    if p.shape != t.shape or p.ndim != 3 or p.shape[0] != 2:
        raise ValueError(f"fields must both be (2, H, W), got {p.shape} and {t.shape}")
    err = np.sqrt(((p - t) ** 2).sum(0))
    return float(err[_mask(mask, err.shape)].mean())


def label_accuracy(predicted_labels, true_labels, mask=None) -> float:
    """Fraction of control points (within ``mask``) whose label equals the true one."""
    p, t = np.asarray(predicted_labels), np.asarray(true_labels)
    if p.shape != t.shape:
        raise ValueError(f"label maps differ in shape: {p.shape} vs {t.shape}")
    return float((p == t)[_mask(mask, p.shape)].mean())


def dice(a, b, label: int) -> float:
    """Dice overlap of ``label`` in two label maps (1.0 when absent from both)."""
    x, y = np.asarray(a) == label, np.asarray(b) == label
    denom = x.sum() + y.sum()
    return 1.0 if denom == 0 else float(2.0 * (x & y).sum() / denom)


def folding_fraction(displacement, mask=None) -> float:
    """Fraction of pixels (within ``mask``) with Jacobian determinant <= 0."""
    jac = jacobian_determinant(displacement)
    return float((jac <= 0)[_mask(mask, jac.shape)].mean())


def normalised_mutual_information(a, b, mask=None, bins: int = 32) -> float:
    """Studholme's NMI ``(H(A) + H(B)) / H(A, B)`` in [1, 2] over ``mask``.

    Intensities are binned between each image's own min and max inside the mask.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = _mask(mask, a.shape)
    x, y = a[m], b[m]
    if x.size < 2:
        return 1.0
    hist, _, _ = np.histogram2d(x, y, bins=bins)
    pxy = hist / hist.sum()
    px, py = pxy.sum(1), pxy.sum(0)

    def h(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    hxy = h(pxy.ravel())
    return 1.0 if hxy == 0 else (h(px) + h(py)) / hxy
