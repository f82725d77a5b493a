"""Source training and MCD adaptation, each a generator of step records.

Long work is a generator so that the command line can show a tqdm bar, the GUI a
progress bar and a live plot, and both can stop it (``generator.close()``) at
any yielded step: nothing is ever left half-updated, because records are only
yielded between complete iterations.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import data as data_mod
from .config import SELECTION_CRITERIA, AdaptConfig, DataConfig, TrainConfig
from .discrepancy import Discrepancy, discrepancy_fn, projected_emd
from .labels import argmax_label, expected_displacement, quantise, soft_labels
from .metrics import normalised_mutual_information
from .model import DiscreteRegistrationNet, probabilities, resolve_device
from .preprocess import check_stack, network_input
from .refine import mind_ssc
from .warp import control_point_field, upsample_field, warp

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

    To resume a run (:func:`~napari_discreg.core.checkpoint.load_training_state`),
    pass its restored ``optimizer`` (Adam over ``model.parameters()``) and the number
    of completed steps as ``start_step``: the one-cycle learning rate continues where
    it was, and the first record is step ``start_step + 1``. ``loss_fn(batch) ->
    (loss, logs)`` replaces :func:`source_cross_entropy` (e.g. the same loss wrapped in
    DistributedDataParallel, :func:`napari_discreg.core.distributed.ddp_source_loss`).
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
            warped = warp(m, dense)
            if "mind" in scores:
                diff = (mind_ssc(f) - mind_ssc(warped)).pow(2).mean(1, keepdim=True)
                scores["mind"].append(-float((diff * mask).sum() / mask.sum().clamp_min(1.0)))
            if "nmi" in scores:
                fg = mask[0, 0].cpu().numpy() > 0
                scores["nmi"].append(
                    normalised_mutual_information(
                        f[0, 0].cpu().numpy(), warped[0, 0].cpu().numpy(), mask=fg
                    )
                )
            if "agreement" in scores:
                cp_fg = F.max_pool2d(mask, stride)[0, 0] > 0
                d = projected_emd(probs[0, 0][cp_fg], probs[1, 0][cp_fg], reduction="none")
                scores["agreement"].append(-float(d.mean()) if d.numel() else 0.0)
    model.train(was_training)
    return {k: float(np.mean(v)) for k, v in scores.items()}


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
    mask = ((ft > 0.05) | (mt > 0.05)).float()
    return ft, mt, mask


# ----------------------------------------------------------------------- adaptation


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def adaptation_optimizers(
    model: DiscreteRegistrationNet, lr: float
) -> dict[str, torch.optim.Optimizer]:
    """The two Adam optimisers of MCD: ``"generator"`` over G, ``"heads"`` over F1 and F2."""
    heads = list(model.F1.parameters()) + list(model.F2.parameters())
    return {
        "generator": torch.optim.Adam(model.G.parameters(), lr=lr),
        "heads": torch.optim.Adam(heads, lr=lr),
    }


@dataclass
class AdaptState:
    """Where an adaptation stands: what :func:`adapt_steps` needs to continue it.

    Pass an empty ``AdaptState()`` as ``state=`` to follow a run: :func:`adapt_steps`
    keeps it up to date at every yielded record (completed ``step``, the best
    weights by the criterion so far, the optimisers). Between two records the model
    holds the current weights; once the generator has ended (finished, closed or
    failed) it holds the best ones and ``weights`` the current ones of the last
    complete iteration (``None`` if it failed inside an iteration: the weights and
    optimisers are then half-updated and not worth resuming). ``rng_state`` and
    ``torch_rng_state`` are the random streams (batches, SWD directions) after the
    last complete iteration. Pass a state with ``step > 0`` (e.g. from
    :func:`~napari_discreg.core.checkpoint.load_adaptation_state`) to continue that
    run: the model must then hold the state's current weights.
    """

    step: int = 0
    best_iteration: int = 0
    best_score: float | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] | None = None
    rng_state: dict | None = None
    torch_rng_state: torch.Tensor | None = None


def adapt_steps(
    model: DiscreteRegistrationNet,
    fixed,
    moving,
    *,
    discrepancy: str | Discrepancy = "pemd",
    steps: int | None = None,
    seed: int | None = None,
    lr: float | None = None,
    config: AdaptConfig | None = None,
    data_config: DataConfig | None = None,
    source: Iterator[Batch] | None = None,
    device=None,
    selection_pairs: int = 16,
    state: AdaptState | None = None,
) -> Generator[StepRecord, None, None]:
    """Adapt ``model`` to unlabelled target pairs by maximum classifier discrepancy.

    Parameters
    ----------
    model : DiscreteRegistrationNet
        Trained on the source domain; adapted in place.
    fixed, moving : array_like, shape (N, H, W)
        Unlabelled target pairs (e.g. T1 fixed vs T2 moving). Their ground truth,
        if any, is never used.
    discrepancy : {"l1", "swd", "pemd"}
        Discrepancy between the heads' histograms (docs/method.md, "Discrepancies").
    steps, seed, lr : optional
        Override the corresponding fields of ``config``.
    source : iterator of batches, optional
        Labelled source batches; default: built-in mono-modal template pairs.
    state : AdaptState, optional
        Kept up to date as the run goes (to save it and resume later); one with
        ``step > 0`` continues that run up to ``steps`` iterations in all: same
        weights, optimiser moments, best-so-far and random streams, so with the
        built-in source (or a ``source`` that continues where it stopped) the resumed
        run is bit-identical on CPU to one that was never interrupted.

    Yields
    ------
    StepRecord
        A first record at the starting iteration (0, or ``state.step``) with the
        initial criterion, then one per MCD iteration (steps A, B and C). Closing the
        generator stops adaptation after a complete iteration.

    Notes
    -----
    Every ``config.select_every`` iterations (and at the start and the end) the
    unsupervised criterion of :func:`selection_criterion` is computed on up to
    ``selection_pairs`` target pairs; when the generator finishes, is closed, or
    fails, the model holds the weights with the best criterion seen (with
    ``config.keep_best``, the default), so running more steps never returns a model
    that scores worse on the criterion than the one passed in. A non-finite loss
    stops adaptation with a ``FloatingPointError`` after the best (or, without
    ``keep_best``, the last evaluated) weights are restored.
    """
    cfg = config or AdaptConfig()
    overrides = {k: v for k, v in (("steps", steps), ("seed", seed), ("lr", lr)) if v is not None}
    if overrides:
        cfg = AdaptConfig(**{**cfg.to_dict(), **overrides})
    if cfg.steps < 0:
        raise ValueError(f"steps must be >= 0, got {cfg.steps}")
    kind = Discrepancy.parse(discrepancy)
    dev = resolve_device(device)
    model.to(dev)
    mcfg = model.config
    tf, tm, tmask = prepare_target(fixed, moving, mcfg.stride, dev)
    state = state if state is not None else AdaptState()
    start = state.step
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if start and state.rng_state is not None and state.torch_rng_state is not None:
        rng.bit_generator.state = state.rng_state  # continue the same streams
        gen.set_state(state.torch_rng_state)
    elif start:  # no saved streams: fresh ones for the resumed part
        rng = np.random.default_rng([cfg.seed, start])
        gen = torch.Generator().manual_seed(cfg.seed + 7919 * start)
    if source is None:
        source = source_batches(
            data_config or DataConfig(),
            cfg.batch_size,
            TrainConfig.source_contrasts,
            rng,
            dev,
            augment=cfg.source_augmentation,
        )
    options: dict = {}
    if kind is Discrepancy.SWD:
        options = {"num_projections": cfg.swd_projections}
    elif kind is Discrepancy.PEMD:
        options = {"diagonals": cfg.pemd_diagonals}
    dfun: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = discrepancy_fn(kind, **options)

    if start < 0 or start > cfg.steps:
        raise ValueError(f"cannot continue a run after step {start} of {cfg.steps}")
    if start and (state.best_weights is None or state.best_score is None):
        raise ValueError("a state with step > 0 needs its best weights and best score")
    if not state.optimizers:
        state.optimizers = adaptation_optimizers(model, cfg.lr)
    opt_g, opt_f = state.optimizers["generator"], state.optimizers["heads"]
    heads = [p for group in opt_f.param_groups for p in group["params"]]
    sel = torch.from_numpy(
        np.random.default_rng(cfg.seed).permutation(tf.shape[0])[:selection_pairs]
    )
    sel_f, sel_m, sel_mask = tf[sel], tm[sel], tmask[sel]

    best_state: dict[str, torch.Tensor]
    first_score: float | None = None
    if start:
        assert state.best_weights is not None and state.best_score is not None
        best_state = state.best_weights
        best_score, best_iter = float(state.best_score), state.best_iteration
    else:
        best_state = _snapshot(model)
        best_score = first_score = selection_criterion(model, sel_f, sel_m, sel_mask, cfg.criterion)
        best_iter = 0
    state.weights = None

    def keep(it: int, score: float, weights: dict[str, torch.Tensor]) -> None:
        nonlocal best_state, best_score, best_iter
        best_state, best_score, best_iter = weights, score, it
        state.best_weights, state.best_score, state.best_iteration = weights, score, it

    keep(best_iter, best_score, best_state)
    state.rng_state, state.torch_rng_state = dict(rng.bit_generator.state), gen.get_state()
    yield StepRecord(start, cfg.steps, {}, None, first_score, best_iter)

    def target_batch():
        idx = torch.from_numpy(rng.integers(0, tf.shape[0], size=cfg.batch_size))
        return tf[idx], tm[idx], tmask[idx]

    def iteration_discrepancy() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        # SWD: new random directions every iteration (Lee et al.), but the same ones in
        # steps B and C, so that G minimises the discrepancy the heads just maximised
        if kind in (Discrepancy.SWD, Discrepancy.PEMD16_SWD):
            return discrepancy_fn(
                kind, **options, seed=int(torch.randint(2**31 - 1, (1,), generator=gen))
            )
        return dfun

    def target_discrepancy(cost: torch.Tensor, mask: torch.Tensor, d: Callable) -> torch.Tensor:
        l1_, l2_ = model.heads(cost)
        p1, p2 = probabilities(l1_), probabilities(l2_)
        fg = F.max_pool2d(mask, mcfg.stride)[:, 0] > 0
        return d(p1[fg], p2[fg])  # (N, K, K) histograms of foreground control points

    busy = False
    try:
        model.train()
        for it in range(start + 1, cfg.steps + 1):
            busy = True
            src = next(source)
            t_fixed, t_moving, t_mask = target_batch()
            dcur = iteration_discrepancy()
            # A: G, F1, F2 on the source cross-entropy
            loss_a, logs = source_cross_entropy(model, src)
            opt_g.zero_grad(set_to_none=True)
            opt_f.zero_grad(set_to_none=True)
            loss_a.backward()
            opt_g.step()
            opt_f.step()
            # B: G frozen; heads keep the source right and disagree on the target
            with torch.no_grad():
                cost_s = model.cost_volume(src["fixed"], src["moving"])
                cost_t = model.cost_volume(t_fixed, t_moving)
            ce_b, _ = source_cross_entropy(model, src, cost=cost_s)
            d_b = target_discrepancy(cost_t, t_mask, dcur)
            loss_b = ce_b - cfg.discrepancy_weight * d_b
            opt_f.zero_grad(set_to_none=True)
            loss_b.backward()
            opt_f.step()
            # C: heads frozen; G makes them agree on the target (n updates)
            for p in heads:
                p.requires_grad_(False)
            try:
                d_c_first = float("nan")
                for n_update in range(cfg.generator_updates):
                    d_c = target_discrepancy(model.cost_volume(t_fixed, t_moving), t_mask, dcur)
                    if n_update == 0:
                        d_c_first = float(d_c.detach())
                    loss_c = cfg.discrepancy_weight * d_c
                    if cfg.source_weight_c > 0:
                        ce_c, _ = source_cross_entropy(model, src)
                        loss_c = loss_c + cfg.source_weight_c * ce_c
                    opt_g.zero_grad(set_to_none=True)
                    loss_c.backward()
                    opt_g.step()
            finally:
                for p in heads:
                    p.requires_grad_(True)
            values = {
                "source_ce": float(loss_a.detach()),
                "source_accuracy": logs["accuracy"],
                "discrepancy_b": float(d_b.detach()),
                "discrepancy_c_first": d_c_first,
                "discrepancy_c": float(d_c.detach()),
            }
            if not all(np.isfinite(v) for k, v in values.items() if k != "source_accuracy"):
                raise FloatingPointError(
                    f"adaptation diverged at iteration {it} (non-finite loss); the best weights "
                    f"(iteration {best_iter}) were restored: lower the learning rate"
                )
            score = None
            if it % cfg.select_every == 0 or it == cfg.steps:
                score = selection_criterion(model, sel_f, sel_m, sel_mask, cfg.criterion)
                if score > best_score or not cfg.keep_best:
                    keep(it, score, _snapshot(model))
            state.step = it
            state.rng_state, state.torch_rng_state = dict(rng.bit_generator.state), gen.get_state()
            busy = False
            yield StepRecord(it, cfg.steps, values, float(d_c.detach()), score, best_iter)
    except GeneratorExit:
        # stopped by the consumer after a complete iteration: consider it as a candidate
        if state.step > start and state.step != best_iter:
            score = selection_criterion(model, sel_f, sel_m, sel_mask, cfg.criterion)
            if score > best_score or not cfg.keep_best:
                keep(state.step, score, _snapshot(model))
        raise
    finally:
        # the weights (and optimiser moments) of the last complete iteration, to resume
        # from: after an exception inside an iteration they are half-updated, so then
        # the state keeps no current weights (resume from an earlier saved state)
        state.weights = None if busy else _snapshot(model)
        model.load_state_dict(best_state)
        model.eval()


def adapt(model: DiscreteRegistrationNet, fixed, moving, **kwargs) -> DiscreteRegistrationNet:
    """Run :func:`adapt_steps` to the end and return the adapted ``model``."""
    for _ in adapt_steps(model, fixed, moving, **kwargs):
        pass
    return model


def clone_model(model: DiscreteRegistrationNet) -> DiscreteRegistrationNet:
    """An independent copy (weights and config) of ``model``."""
    return copy.deepcopy(model)
