"""The K x K displacement label grid: offsets, quantisation, soft labels, read-out.

A label is a pair ``(a, b)`` of bin indices, ``a`` along rows and ``b`` along
columns, flattened as ``a * K + b``. Bin ``k`` is the displacement
``offsets[k] = q * linspace(-1, 1, K)[k]`` pixels. A probability histogram over
labels has shape ``(..., K, K)`` with the row displacement on the first axis.
"""

from __future__ import annotations

import torch


def label_offsets(
    num_labels: int, capture_range: float, *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Displacement in pixels of each of the K bins along one axis."""
    return torch.linspace(-capture_range, capture_range, num_labels, device=device, dtype=dtype)


def _fractional_bin(
    displacement: torch.Tensor, num_labels: int, capture_range: float
) -> torch.Tensor:
    step = 2.0 * capture_range / (num_labels - 1)
    return ((displacement + capture_range) / step).clamp(0.0, num_labels - 1.0)


def quantise(field: torch.Tensor, num_labels: int, capture_range: float) -> torch.Tensor:
    """Nearest label of a control-point field (B, 2, h, w) -> (B, h, w) int64 in [0, K^2).

    Displacements beyond the capture range are clamped to the outermost bin.
    """
    f = _fractional_bin(field, num_labels, capture_range).round().long()
    return f[:, 0] * num_labels + f[:, 1]


def label_to_displacement(
    labels: torch.Tensor, num_labels: int, capture_range: float
) -> torch.Tensor:
    """Inverse of :func:`quantise`: (B, h, w) labels -> (B, 2, h, w) pixels."""
    offsets = label_offsets(num_labels, capture_range, device=labels.device)
    return torch.stack([offsets[labels // num_labels], offsets[labels % num_labels]], dim=1)


def soft_labels(field: torch.Tensor, num_labels: int, capture_range: float) -> torch.Tensor:
    """Bilinear soft labels (B, h, w, K, K) of a control-point field (B, 2, h, w).

    The mass is split between the two nearest bins on each axis in proportion to
    closeness, so the expected displacement of the soft label equals the field
    exactly inside the capture range.
    """
    f = _fractional_bin(field, num_labels, capture_range)
    lo = f.floor().clamp(max=num_labels - 2)
    frac = f - lo
    lo = lo.long()
    b, _, h, w = field.shape
    one_d = []
    for axis in range(2):
        hist = torch.zeros(b, h, w, num_labels, device=field.device, dtype=field.dtype)
        hist.scatter_(-1, lo[:, axis, ..., None], (1.0 - frac[:, axis, ..., None]))
        hist.scatter_add_(-1, lo[:, axis, ..., None] + 1, frac[:, axis, ..., None])
        one_d.append(hist)
    return one_d[0][..., :, None] * one_d[1][..., None, :]


def expected_displacement(prob: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sub-pixel read-out: probabilities (B, h, w, K, K) -> mean displacement (B, 2, h, w)."""
    row = (prob.sum(-1) * offsets).sum(-1)
    col = (prob.sum(-2) * offsets).sum(-1)
    return torch.stack([row, col], dim=1)


def argmax_label(prob: torch.Tensor) -> torch.Tensor:
    """Most probable label (B, h, w) of probabilities (B, h, w, K, K)."""
    return prob.flatten(-2).argmax(-1)


def entropy(prob: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Shannon entropy (nats) of each histogram (..., K, K) -> (...)."""
    p = prob.flatten(-2)
    return -(p * (p + eps).log()).sum(-1)
