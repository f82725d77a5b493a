"""Inference (the mean-head field of a model) and the unsupervised keep-best criteria."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import FOREGROUND_THRESHOLD, SELECTION_CRITERIA
from ..learning.discrepancy import projected_emd
from ..learning.model import DiscreteRegistrationNet, probabilities
from .label_grid import expected_displacement
from .metrics import normalised_mutual_information
from .mind import mind_ssc
from .preprocess import check_stack, network_input
from .warp import upsample_field, warp

# ----------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_field(
    model: DiscreteRegistrationNet, fixed: torch.Tensor, moving: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-head prediction for padded (B, 1, H, W) pairs.

    Returns the dense field (B, 2, H, W), the control-point field (B, 2, h, w) and
    the probabilities of both heads (2, B, h, w, K, K).
    """
    logits1, logits2 = model(fixed, moving)
    probs = torch.stack([probabilities(logits1), probabilities(logits2)])
    cp = expected_displacement(probs.mean(0), model.offsets)
    dense = upsample_field(cp, model.config.stride, (int(fixed.shape[-2]), int(fixed.shape[-1])))
    return dense, cp, probs


def selection_scores(
    model: DiscreteRegistrationNet,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    masks: torch.Tensor,
    kinds: tuple[str, ...] = SELECTION_CRITERIA,
) -> dict[str, float]:
    """Every unsupervised model-selection score in ``kinds`` (higher is better), in one pass.

    ``"mind"``: minus the mean squared difference of the MIND-SSC descriptors of fixed and
    warped moving over the foreground, the similarity the refinement optimises
    (contrast-invariant and local, so it sees a few pixels of misalignment);
    ``"nmi"``: mean normalised mutual information of fixed and warped (a global histogram
    statistic, which kept early weights of runs that later improved a lot);
    ``"agreement"``: minus the mean projected EMD (bins) between the two heads'
    histograms over the foreground control points (the quantity MCD drives down).
    """
    unknown = [k for k in kinds if k not in SELECTION_CRITERIA]
    if unknown:
        raise ValueError(
            f"unknown selection criterion {unknown[0]!r}; expected one of {SELECTION_CRITERIA}"
        )
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {k: [] for k in kinds}
    stride = model.config.stride
    with torch.no_grad():
        for i in range(fixed.shape[0]):
            f, m, mask = fixed[i : i + 1], moving[i : i + 1], masks[i : i + 1]
            dense, _, probs = predict_field(model, f, m)
            _image_scores(scores, f, warp(m, dense), mask)
            if "agreement" in scores:
                cp_fg = F.max_pool2d(mask, stride)[0, 0] > 0
                d = projected_emd(probs[0, 0][cp_fg], probs[1, 0][cp_fg], reduction="none")
                scores["agreement"].append(-float(d.mean()) if d.numel() else 0.0)
    model.train(was_training)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def foreground_mind_distance(f: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean squared difference of the MIND-SSC descriptors of ``f`` and ``warped`` over
    ``mask`` (the ``"mind"`` criterion is minus this)."""
    diff = (mind_ssc(f) - mind_ssc(warped)).pow(2).mean(1, keepdim=True)
    return float((diff * mask).sum() / mask.sum().clamp_min(1.0))


def _image_scores(
    scores: dict[str, list[float]], f: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor
) -> None:
    """Append the image scores (``"mind"``, ``"nmi"``) of one fixed/warped pair."""
    if "mind" in scores:
        scores["mind"].append(-foreground_mind_distance(f, warped, mask))
    if "nmi" in scores:
        fg = mask[0, 0].cpu().numpy() > 0
        scores["nmi"].append(
            normalised_mutual_information(
                f[0, 0].cpu().numpy(), warped[0, 0].cpu().numpy(), mask=fg
            )
        )


@torch.no_grad()
def identity_criterion(
    fixed: torch.Tensor, moving: torch.Tensor, masks: torch.Tensor, kind: str = "mind"
) -> float | None:
    """The selection score of no registration (moving as it is) on the same pairs, to
    compare a model's :func:`selection_criterion` with; ``None`` for ``"agreement"``,
    which only a model has."""
    if kind not in SELECTION_CRITERIA:
        raise ValueError(
            f"unknown selection criterion {kind!r}; expected one of {SELECTION_CRITERIA}"
        )
    if kind == "agreement":
        return None
    scores: dict[str, list[float]] = {kind: []}
    for i in range(fixed.shape[0]):
        _image_scores(scores, fixed[i : i + 1], moving[i : i + 1], masks[i : i + 1])
    return float(np.mean(scores[kind]))


def selection_criterion(
    model: DiscreteRegistrationNet,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    masks: torch.Tensor,
    kind: str = "mind",
) -> float:
    """One unsupervised model-selection score on unlabelled pairs (higher is better);
    the kinds are those of :func:`selection_scores`."""
    return selection_scores(model, fixed, moving, masks, (kind,))[kind]


def prepare_target(fixed, moving, stride: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Validate, normalise and pad unlabelled target pairs (N, H, W) -> tensors."""
    f = check_stack(fixed, "fixed")
    m = check_stack(moving, "moving")
    if f.shape != m.shape:
        raise ValueError(f"fixed {f.shape} and moving {m.shape} stacks must have the same shape")
    ft = network_input(f, stride, device)
    mt = network_input(m, stride, device)
    mask = ((ft > FOREGROUND_THRESHOLD) | (mt > FOREGROUND_THRESHOLD)).float()
    return ft, mt, mask
