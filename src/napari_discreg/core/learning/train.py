"""Losses and supervised source training of G, F1 and F2, as generators of step records."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig, TrainConfig
from ..data import template as data_mod
from ..registration.label_grid import argmax_label, quantise, soft_labels
from ..registration.warp import control_point_field
from .model import DiscreteRegistrationNet, probabilities, resolve_device

Batch = dict[str, torch.Tensor]


@dataclass
class StepRecord:
    """What one training or adaptation iteration reports.

    ``losses`` maps a loss name to its value; ``discrepancy`` is the target
    discrepancy of step C (adaptation only); ``criterion`` the unsupervised model
    selection score (:func:`selection_criterion`, higher is better) when it was
    evaluated at this iteration, else ``None``.
    """

    iteration: int
    total: int
    losses: dict[str, float] = field(default_factory=dict)
    discrepancy: float | None = None
    criterion: float | None = None
    best_iteration: int | None = None


# --------------------------------------------------------------------------- losses


def control_point_weights(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, h, w) weights: 1 on control points that touch the foreground, 0.1 elsewhere.

    Background points carry little evidence, but training on them a little keeps the
    field smooth there.
    """
    fg = (F.max_pool2d(mask.float(), stride) > 0).float()[:, 0]
    return 0.1 + 0.9 * fg


def source_cross_entropy(
    model: DiscreteRegistrationNet, batch: Batch, cost: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft-label cross-entropy of both heads on a labelled batch.

    Returns the summed loss and a dict of logged values (per-head CE and the
    label accuracy of the mean prediction on foreground control points).
    """
    cfg = model.config
    if cost is None:
        cost = model.cost_volume(batch["fixed"], batch["moving"])
    logits1, logits2 = model.heads(cost)
    cp = control_point_field(batch["displacement"], cfg.stride)
    target = soft_labels(cp, cfg.num_labels, cfg.capture_range).flatten(-2)
    weights = control_point_weights(batch["mask"], cfg.stride)
    norm = weights.sum()
    ce = []
    for logits in (logits1, logits2):
        per_point = -(target * F.log_softmax(logits.flatten(-2), dim=-1)).sum(-1)
        ce.append((per_point * weights).sum() / norm)
    with torch.no_grad():
        prob = 0.5 * (probabilities(logits1) + probabilities(logits2))
        hit = (argmax_label(prob) == quantise(cp, cfg.num_labels, cfg.capture_range)).float()
        fg = weights > 0.5
        acc = float(hit[fg].mean()) if bool(fg.any()) else float("nan")
    return ce[0] + ce[1], {
        "ce_f1": float(ce[0].detach()),
        "ce_f2": float(ce[1].detach()),
        "accuracy": acc,
    }


# ------------------------------------------------------------------ source training


def source_pairs(contrasts: tuple[str, ...], augment: bool) -> tuple[tuple[str, str], ...]:
    """The (fixed, moving) contrast pairs of the source domain: each contrast with itself,
    and with ``augment`` as many again pairs of two independently random contrasts."""
    pairs = tuple((c, c) for c in contrasts)
    if augment:
        pairs += ((data_mod.AUGMENTED, data_mod.AUGMENTED),) * max(len(pairs), 1)
    return pairs


def source_batches(
    config: DataConfig,
    batch_size: int,
    contrasts: tuple[str, ...],
    rng: np.random.Generator,
    device: torch.device,
    *,
    augment: bool = False,
) -> Iterator[Batch]:
    """Endless labelled source batches: mono-modal pairs of ``contrasts`` and, with
    ``augment``, as many pairs with random contrasts (:func:`source_pairs`)."""
    template = data_mod.load_template(config.size)
    pairs = source_pairs(contrasts, augment)
    while True:
        batch = data_mod.sample_batch(template, "train", batch_size, rng, config, pairs=pairs)
        yield {k: v.to(device) for k, v in batch.items()}


def template_batches(
    config: DataConfig,
    batch_size: int,
    contrasts: tuple[str, ...],
    seed: int,
    device: torch.device,
    *,
    rank: int = 0,
    start_step: int = 0,
    augment: bool = False,
) -> Iterator[Batch]:
    """Like :func:`source_batches`, but batch ``s`` (0-based step) on ``rank`` is drawn
    from its own generator ``default_rng([seed, rank, s])``: the stream does not depend
    on where it started, so a run resumed after step ``start_step`` sees exactly the
    batches an uninterrupted one would have seen, and every rank has its own."""
    template = data_mod.load_template(config.size)
    pairs = source_pairs(contrasts, augment)
    step = start_step
    while True:
        rng = np.random.default_rng([seed, rank, step])
        batch = data_mod.sample_batch(template, "train", batch_size, rng, config, pairs=pairs)
        yield {k: v.to(device) for k, v in batch.items()}
        step += 1


def train_steps(
    model: DiscreteRegistrationNet,
    *,
    config: TrainConfig | None = None,
    data_config: DataConfig | None = None,
    batches: Iterator[Batch] | None = None,
    device=None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    loss_fn: Callable[[Batch], tuple[torch.Tensor, dict[str, float]]] | None = None,
) -> Generator[StepRecord, None, None]:
    """Supervised source training of G, F1 and F2; yields one record per step.

    ``batches`` defaults to mono-modal pairs of ``config.source_contrasts`` made from
    the template. The model is trained in place.

    To resume a run (:func:`~napari_discreg.core.files.resume.load_training_state`),
    pass its restored ``optimizer`` (Adam over ``model.parameters()``) and the number
    of completed steps as ``start_step``: the one-cycle learning rate continues where
    it was, and the first record is step ``start_step + 1``. ``loss_fn(batch) ->
    (loss, logs)`` replaces :func:`source_cross_entropy` (e.g. the same loss wrapped in
    DistributedDataParallel, :func:`napari_discreg.core.learning.distributed.ddp_source_loss`).
    """
    config = config or TrainConfig()
    data_config = data_config or DataConfig()
    if not 0 <= start_step <= config.steps:
        raise ValueError(f"start_step must be in [0, {config.steps}], got {start_step}")
    dev = resolve_device(device)
    model.to(dev).train()
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    if batches is None:
        batches = source_batches(
            data_config,
            config.batch_size,
            config.source_contrasts,
            rng,
            dev,
            augment=config.contrast_augmentation,
        )
    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.steps >= 20:
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1
        )
    else:  # too short for a warm-up phase (OneCycleLR divides by zero): constant rate
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if start_step > 0:  # the schedule is a function of the step: jump to it
        sched.last_epoch = start_step - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            sched.step()
    compute = loss_fn if loss_fn is not None else (lambda b: source_cross_entropy(model, b))
    for step in range(start_step, config.steps):
        batch = next(batches)
        loss, logs = compute(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        yield StepRecord(step + 1, config.steps, {"loss": float(loss.detach()), **logs})
    model.eval()
