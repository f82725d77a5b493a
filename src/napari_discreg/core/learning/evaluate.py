"""Evaluate a model on pairs with known ground truth (docs/method.md, "Metrics")."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RefineConfig
from ..data.template import TISSUES, Pair
from ..registration.label_grid import argmax_label, quantise
from ..registration.metrics import dice, end_point_error, folding_fraction
from ..registration.predict import predict_field
from ..registration.preprocess import network_input, pad_to_multiple
from ..registration.refine import refine_field
from ..registration.warp import control_point_field, warp_numpy
from .model import DiscreteRegistrationNet

METRICS = ("label_accuracy", "epe", "dice_csf", "dice_gm", "dice_wm", "folding", "seconds")


def pair_metrics(
    pair: Pair, displacement: np.ndarray, labels: np.ndarray | None, stride: int, k: int, q: float
) -> dict[str, float]:
    """Metrics of one predicted dense field (2, H, W) (and control-point labels) on ``pair``."""
    mask = pair.mask > 0
    out = {"epe": end_point_error(displacement, pair.displacement, mask)}
    warped_labels = warp_numpy(pair.moving_labels, displacement, order=0)
    for value, name in enumerate(TISSUES, start=1):
        out[f"dice_{name}"] = dice(warped_labels, pair.fixed_labels, value)
    out["folding"] = folding_fraction(displacement, mask)
    if labels is not None:
        out["label_accuracy"] = control_point_accuracy(
            labels, pair.displacement, mask, stride, k, q
        )
    return out


def control_point_accuracy(
    labels: np.ndarray, truth: np.ndarray, mask: np.ndarray, stride: int, k: int, q: float
) -> float:
    """Share of foreground control points whose label (h, w) equals the quantised true
    field (2, H, W); NaN when no control point touches ``mask``.

    Control points cover the image padded to a multiple of the stride, as in register.
    """
    t = pad_to_multiple(torch.from_numpy(np.asarray(truth, np.float32))[None], stride)
    cp_true = quantise(control_point_field(t, stride), k, q)[0].numpy()
    fg_mask = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    ph, pw = t.shape[-2] - fg_mask.shape[-2], t.shape[-1] - fg_mask.shape[-1]
    fg = F.max_pool2d(F.pad(fg_mask, (0, pw, 0, ph)), stride)[0, 0].numpy() > 0
    return float((labels == cp_true)[fg].mean()) if fg.any() else float("nan")


def evaluate_model(
    model: DiscreteRegistrationNet | None,
    pairs: Sequence[Pair],
    *,
    refine: RefineConfig | None = None,
    stride: int = 4,
    k: int = 15,
    q: float = 7.0,
) -> dict[str, list[float]]:
    """Per-pair metrics of ``model`` on ``pairs`` (images normalised like :func:`register`).

    With ``refine``, the network's field is refined as ``register(refine=...)`` does,
    and the label accuracy is that of the refined field's quantised control points.
    ``model=None`` with ``refine``: refinement alone, from a zero field (``stride``,
    ``k`` and ``q`` then define the control points and labels of the accuracy).
    """
    refining = refine is not None and refine.steps > 0
    if model is None and not refining:
        raise ValueError("evaluate_model needs a model, a refinement or both")
    dev = torch.device("cpu")
    if model is not None:
        stride, k, q = model.config.stride, model.config.num_labels, model.config.capture_range
        dev = next(model.parameters()).device
        model.eval()
    results: dict[str, list[float]] = {m: [] for m in METRICS}
    for pair in pairs:
        h, w = pair.fixed.shape
        t0 = time.perf_counter()
        f = network_input(pair.fixed, stride, dev)
        m = network_input(pair.moving, stride, dev)
        dense = None
        if model is not None:
            dense, _, probs = predict_field(model, f, m)
            labels = argmax_label(probs.mean(0))
        if refining:
            dense = refine_field(f, m, dense, refine)
            labels = quantise(control_point_field(dense, stride), k, q)
        assert dense is not None
        disp = dense[0, :, :h, :w].cpu().numpy()
        seconds = time.perf_counter() - t0
        vals = pair_metrics(pair, disp, labels[0].cpu().numpy(), stride, k, q)
        vals["seconds"] = seconds
        for key in METRICS:
            results[key].append(vals.get(key, float("nan")))
    return results


def identity_metrics(
    pairs: Sequence[Pair], stride: int, k: int, q: float
) -> dict[str, list[float]]:
    """Metrics of the zero field (no registration) on ``pairs``."""
    results: dict[str, list[float]] = {m: [] for m in METRICS}
    zero_label = (k // 2) * k + k // 2
    for pair in pairs:
        h, w = pair.fixed.shape
        labels = np.full((-(-h // stride), -(-w // stride)), zero_label)
        vals = pair_metrics(pair, np.zeros((2, h, w), np.float32), labels, stride, k, q)
        vals["seconds"] = 0.0
        for key in METRICS:
            results[key].append(vals[key])
    return results


def summarise(results: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each metric."""
    return {k: float(np.nanmean(v)) for k, v in results.items() if len(v)}
