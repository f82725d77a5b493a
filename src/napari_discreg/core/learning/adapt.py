"""Maximum classifier discrepancy adaptation (Saito et al. 2018) to unlabelled target pairs."""

from __future__ import annotations

import copy
import gc
import sys
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AdaptConfig, DataConfig, TrainConfig
from ..registration.predict import prepare_target, selection_criterion
from .discrepancy import Discrepancy, discrepancy_fn
from .model import DiscreteRegistrationNet, probabilities, resolve_device
from .self_train import SelfTraining
from .train import Batch, StepRecord, source_batches, source_cross_entropy

# ----------------------------------------------------------------------- adaptation


def snapshot_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state dict that later updates of the model leave alone."""
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
    holds the current weights; once the generator has ended (finished, closed,
    dropped or failed) it holds the best ones and ``weights`` the current ones of the last
    complete iteration (``None`` if it failed inside an iteration: the weights and
    optimisers are then half-updated and not worth resuming). ``rng_state`` and
    ``torch_rng_state`` are the random streams (batches, SWD directions) after the
    last complete iteration. Pass a state with ``step > 0`` (e.g. from
    :func:`~napari_discreg.core.files.resume.load_adaptation_state`) to continue that
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
    #: self-training's pseudo-labels (made once at the start; a resumed run reuses them)
    pseudo_targets: torch.Tensor | None = None
    #: self-training: the refined fields' MIND-SSC gain over the model's (below
    #: ``AdaptConfig.min_pseudo_gain`` the run learns nothing and keeps the start)
    pseudo_gain: float | None = None


def holdout_split(
    n: int, holdout: float, seed: int, max_selection: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the target pairs to adapt on and of those that judge the weights.

    A seeded permutation of the ``n`` pairs; with ``holdout > 0`` and two pairs or more,
    its first ``round(holdout * n)`` pairs (at least 1, at most ``n - 1`` and
    ``max_selection``) are held out: the keep-best criterion is computed on them and no
    batch is drawn from them. With ``holdout == 0`` (or a single pair) every pair is
    adapted on and the first ``max_selection`` of the permutation also select.
    """
    order = np.random.default_rng(seed).permutation(n)
    if holdout > 0 and n >= 2:
        k = min(max(1, round(holdout * n)), n - 1, max_selection)
        return np.sort(order[k:]), order[:k]
    return np.arange(n), order[:max_selection]


class StopAdaptation(Exception):
    """Throw into an :func:`adapt_steps` generator at a record to end it as a
    ``should_stop`` does: the last complete iteration is scored as a keep-best candidate
    and the generator returns (``steps.throw(StopAdaptation())`` raises
    ``StopIteration``). Unlike ``close()``, which scores nothing (it may come from a
    finaliser), this is explicit work: what an interactive Stop or a Ctrl-C wants."""


class _Stopped(StopAdaptation):
    """Raised inside :func:`adapt_steps` when ``should_stop()`` says so."""


#: the models an :func:`adapt_steps` generator is adapting now (model -> its token)
_ADAPTING: weakref.WeakKeyDictionary[torch.nn.Module, object] = weakref.WeakKeyDictionary()


def _claim(model: torch.nn.Module, token: object) -> None:
    """Mark ``model`` as adapted by the generator of ``token``; refuse a second one."""
    if model in _ADAPTING:
        gc.collect()  # an abandoned generator in a reference cycle lets go of it here
    if model in _ADAPTING:
        raise RuntimeError(
            "this model is already being adapted by another adapt_steps generator that has "
            "not ended: run that one to the end or close() it first (two adaptations of one "
            "model would interleave their updates), or adapt a copy (clone_model)"
        )
    _ADAPTING[model] = token


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
    should_stop: Callable[[], bool] | None = None,
) -> Generator[StepRecord, None, None]:
    """Adapt ``model`` to unlabelled target pairs, by ``config.method``.

    ``"self-training"`` (the default, :mod:`~napari_discreg.core.learning.self_train`): the heads
    learn the model's own fields refined by MIND-SSC instance optimisation, made once at
    the start; one Adam step per iteration. ``"mcd"``: maximum classifier discrepancy
    (Saito et al. 2018) with ``discrepancy`` between the heads, as in the paper; one
    iteration is its steps A, B and C.

    Parameters
    ----------
    model : DiscreteRegistrationNet
        Trained on the source domain; adapted in place.
    fixed, moving : array_like, shape (N, H, W)
        Unlabelled target pairs (e.g. T1 fixed vs T2 moving). Their ground truth,
        if any, is never used.
    discrepancy : {"l1", "swd", "pemd", "pemd16", "pemd16+"}
        MCD's discrepancy between the heads' histograms (docs/method.md,
        "Discrepancies"); self-training does not use it.
    steps, seed, lr : optional
        Override the corresponding fields of ``config``.
    source : iterator of batches, optional
        Labelled source batches of MCD; default: built-in mono-modal template pairs.
    state : AdaptState, optional
        Kept up to date as the run goes (to save it and resume later); one with
        ``step > 0`` continues that run up to ``steps`` iterations in all: same
        weights, optimiser moments, best-so-far and random streams, so with the
        built-in source (or a ``source`` that continues where it stopped) the resumed
        run is bit-identical on CPU to one that was never interrupted.
    should_stop : callable, optional
        Checked between the passes of an iteration (after step A, after step B and
        after every step-C update), so a stop takes effect within one pass instead of
        one iteration. When it returns True the iteration in progress is undone (the
        weights and optimiser moments of the last complete iteration are restored),
        those weights are scored by the selection criterion as a candidate, and the
        generator returns.

    Yields
    ------
    StepRecord
        A first record at the starting iteration (0, or ``state.step``) with the
        initial criterion, then one per iteration. Between two records the model
        holds the current weights, in training mode.

    Raises
    ------
    RuntimeError
        Another ``adapt_steps`` generator that has not ended holds ``model`` (when
        this one starts): one model takes one adaptation at a time.

    Notes
    -----
    Every ``config.select_every`` iterations (and at the start and the end) the
    unsupervised criterion of :func:`selection_criterion` is computed on up to
    ``selection_pairs`` target pairs, held out from adaptation by ``config.holdout``
    (:func:`holdout_split`); when the generator ends, the model holds the weights with
    the best criterion seen (with ``config.keep_best``, the default; without it, the
    last scored ones), in eval mode, so running more steps never returns a model that
    scores worse on the criterion than the one passed in. A non-finite loss stops
    adaptation with a ``FloatingPointError`` after those weights are restored.

    **Ending early: the best weights are what** ``close()`` **gives.** Closing the
    generator at a record stops adaptation after that complete iteration: the model
    gets the best weights among those already scored (the start, every
    ``select_every`` iterations, and after a ``should_stop`` the last complete
    iteration; closing scores nothing itself), in eval mode, and ``state.weights``
    the current ones (to resume from). To have the last complete iteration scored as
    well, end it with ``steps.throw(StopAdaptation())`` instead (as ``should_stop``). Dropping the generator (``del``, garbage
    collection, or ``break`` out of ``for record in adapt_steps(...)``, which drops
    it) closes it, with the same result; nothing is computed at interpreter exit. A
    generator left by ``break`` but still referenced has *not* ended: the model keeps
    the current weights in training mode, and no other generator may adapt it, until
    it is closed or dropped (``with contextlib.closing(adapt_steps(...)) as steps:``
    closes it on leaving the block).
    """
    token = object()
    registry = _ADAPTING  # a local: module globals may be cleared at interpreter exit
    _claim(model, token)
    try:
        yield from _adapt_steps(
            model,
            fixed,
            moving,
            discrepancy=discrepancy,
            steps=steps,
            seed=seed,
            lr=lr,
            config=config,
            data_config=data_config,
            source=source,
            device=device,
            selection_pairs=selection_pairs,
            state=state,
            should_stop=should_stop,
        )
    finally:
        if registry.get(model) is token:
            del registry[model]


def _adapt_steps(
    model: DiscreteRegistrationNet,
    fixed,
    moving,
    *,
    discrepancy: str | Discrepancy,
    steps: int | None,
    seed: int | None,
    lr: float | None,
    config: AdaptConfig | None,
    data_config: DataConfig | None,
    source: Iterator[Batch] | None,
    device,
    selection_pairs: int,
    state: AdaptState | None,
    should_stop: Callable[[], bool] | None,
) -> Generator[StepRecord, None, None]:
    """The body of :func:`adapt_steps` (which holds the model for it)."""
    finalizing = sys.is_finalizing  # a local: module globals may be gone at exit
    cfg = config or AdaptConfig()
    overrides = {k: v for k, v in (("steps", steps), ("seed", seed), ("lr", lr)) if v is not None}
    if overrides:
        cfg = AdaptConfig(**{**cfg.to_dict(), **overrides})
    if cfg.steps < 0:
        raise ValueError(f"steps must be >= 0, got {cfg.steps}")
    kind = Discrepancy.parse(discrepancy)
    dev = resolve_device(device)
    model.to(dev)
    tf, tm, tmask = prepare_target(fixed, moving, model.config.stride, dev)
    state = state if state is not None else AdaptState()
    start = state.step
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if start and state.rng_state is not None and state.torch_rng_state is not None:
        try:  # continue the same streams
            rng.bit_generator.state = state.rng_state
            gen.set_state(state.torch_rng_state)
        except (TypeError, ValueError, KeyError, OverflowError, RuntimeError) as exc:
            raise ValueError(
                f"the adaptation state is corrupt (its random streams: {exc})"
            ) from exc
    elif start:  # no saved streams: fresh ones for the resumed part
        rng = np.random.default_rng([cfg.seed, start])
        gen = torch.Generator().manual_seed(cfg.seed + 7919 * start)
    if start < 0 or start > cfg.steps:
        raise ValueError(f"cannot continue a run after step {start} of {cfg.steps}")
    if start and (state.best_weights is None or state.best_score is None):
        raise ValueError("a state with step > 0 needs its best weights and best score")
    if start and not (
        np.isfinite(float(state.best_score or 0.0)) and 0 <= state.best_iteration <= start
    ):
        raise ValueError(
            f"the adaptation state is corrupt (best score {state.best_score!r} at iteration "
            f"{state.best_iteration!r} of {start}: keep-best could never improve on it)"
        )

    adapt_on, held = holdout_split(tf.shape[0], cfg.holdout, cfg.seed, selection_pairs)
    sel = torch.from_numpy(held)
    sel_f, sel_m, sel_mask = tf[sel], tm[sel], tmask[sel]
    keep_idx = torch.from_numpy(adapt_on)
    tf, tm, tmask = tf[keep_idx], tm[keep_idx], tmask[keep_idx]

    targets, stride = state.pseudo_targets, model.config.stride
    grid = (tf.shape[0], tf.shape[-2] // stride, tf.shape[-1] // stride)
    if cfg.method == "self-training" and targets is not None and targets.shape[:3] != grid:
        raise ValueError(
            f"the adaptation state is corrupt or its target pairs changed: pseudo-labels of "
            f"shape {tuple(targets.shape[:3])}, the run's pairs need {grid}"
        )
    if cfg.method == "self-training":
        trainer = SelfTraining(model, tf, tm, tmask, cfg, rng, targets=state.pseudo_targets)
        state.pseudo_targets = trainer.pair_targets
        if trainer.gain is not None:
            state.pseudo_gain = trainer.gain
        iteration: Callable[..., tuple[dict[str, float], float | None]] = _self_training_step(
            trainer, state
        )
        frozen: SelfTraining | None = trainer
    else:
        iteration = _mcd_iteration(
            model, cfg, kind, (tf, tm, tmask), state, rng, gen, source, data_config, dev
        )
        frozen = None
    if not state.optimizers:
        state.optimizers = (
            trainer.optimizers(cfg.lr)
            if frozen is not None
            else adaptation_optimizers(model, cfg.lr)
        )

    best_state: dict[str, torch.Tensor]
    first_score: float | None = None
    if start:
        assert state.best_weights is not None and state.best_score is not None
        best_state = state.best_weights
        best_score, best_iter = float(state.best_score), state.best_iteration
    else:
        best_state = snapshot_weights(model)
        best_score = first_score = selection_criterion(model, sel_f, sel_m, sel_mask, cfg.criterion)
        best_iter = 0
    state.weights = None

    def keep(it: int, score: float, weights: dict[str, torch.Tensor]) -> None:
        nonlocal best_state, best_score, best_iter
        best_state, best_score, best_iter = weights, score, it
        state.best_weights, state.best_score, state.best_iteration = weights, score, it

    keep(best_iter, best_score, best_state)
    state.rng_state, state.torch_rng_state = dict(rng.bit_generator.state), gen.get_state()

    def consider_last() -> None:
        """The weights of the last complete iteration, scored as a keep-best candidate."""
        if state.step > start and state.step != best_iter:
            score = selection_criterion(model, sel_f, sel_m, sel_mask, cfg.criterion)
            if score > best_score or not cfg.keep_best:
                keep(state.step, score, snapshot_weights(model))

    def check_stop() -> None:
        """Between the passes of an iteration: a stop asked for ends it there."""
        if should_stop is not None and should_stop():
            raise _Stopped

    # self-training with nothing to learn (the refined fields barely better than the
    # model's own): no iteration runs, the model is returned as it came
    last = (
        start
        if state.pseudo_gain is not None and state.pseudo_gain < cfg.min_pseudo_gain
        else cfg.steps
    )
    busy = False
    undo: tuple = ()
    try:
        yield StepRecord(start, cfg.steps, {}, None, first_score, best_iter)
        model.train()
        if frozen is not None:
            frozen.freeze(True)
        for it in range(start + 1, last + 1):
            if should_stop is not None:
                check_stop()
                # to undo an iteration stopped half-way (weights and Adam moments)
                undo = (
                    snapshot_weights(model),
                    {k: copy.deepcopy(o.state_dict()) for k, o in state.optimizers.items()},
                )
            busy = True
            values, record_discrepancy = iteration(check_stop)
            if not all(np.isfinite(v) for k, v in values.items() if k != "source_accuracy"):
                raise FloatingPointError(
                    f"adaptation diverged at iteration {it} (non-finite loss); the best weights "
                    f"(iteration {best_iter}) were restored: lower the learning rate"
                )
            score = None
            if it % cfg.select_every == 0 or it == cfg.steps:
                score = selection_criterion(model, sel_f, sel_m, sel_mask, cfg.criterion)
                if score > best_score or not cfg.keep_best:
                    keep(it, score, snapshot_weights(model))
            state.step = it
            state.rng_state, state.torch_rng_state = dict(rng.bit_generator.state), gen.get_state()
            busy = False
            yield StepRecord(it, cfg.steps, values, record_discrepancy, score, best_iter)
    except StopAdaptation:  # should_stop() said so, or thrown in at a record
        if busy:  # undo the iteration in progress: back to the last complete one
            weights, moments = undo
            model.load_state_dict(weights)
            for k, o in state.optimizers.items():
                o.load_state_dict(moments[k])
            busy = False
        if not finalizing():
            consider_last()
    finally:
        # Ended, however: finished, stopped, failed, or closed at a record (close(), or
        # del / garbage collection of the generator, which close it). Nothing is scored
        # here, since a close may come from a finaliser: the kept weights are the best of
        # those already scored, whichever way the run ended. At interpreter exit nothing
        # can use the model any more, and torch work then may abort the process: skipped.
        if not finalizing():
            if frozen is not None:
                frozen.freeze(False)
            # the weights (and optimiser moments) of the last complete iteration, to
            # resume from: after an exception inside an iteration they are half-updated,
            # so then the state keeps no current weights (an earlier saved state can)
            state.weights = None if busy else snapshot_weights(model)
            model.load_state_dict(best_state)
            model.eval()


def _self_training_step(trainer: SelfTraining, state: AdaptState):
    """One self-training iteration: an Adam step of the heads on the pseudo-labels."""

    def run(check_stop: Callable[[], None]) -> tuple[dict[str, float], None]:
        return trainer.step(state.optimizers["heads"]), None  # one pass: nothing to check

    return run


def _mcd_iteration(model, cfg, kind, target, state, rng, gen, source, data_config, dev):
    """One MCD iteration (steps A, B and C of Saito et al.) as a function, with its source
    batches and discrepancy; it returns the losses and step C's target discrepancy."""
    mcfg = model.config
    tf, tm, tmask = target
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
    if kind in (Discrepancy.SWD, Discrepancy.PEMD16_SWD):
        options = {"num_projections": cfg.swd_projections}
    elif kind is Discrepancy.PEMD:
        options = {"diagonals": cfg.pemd_diagonals}
    dfun: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = discrepancy_fn(kind, **options)

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

    def run(check_stop: Callable[[], None]) -> tuple[dict[str, float], float]:
        opt_g, opt_f = state.optimizers["generator"], state.optimizers["heads"]
        heads = [p for group in opt_f.param_groups for p in group["params"]]
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
        check_stop()
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
        check_stop()
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
                check_stop()
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
        return values, float(d_c.detach())

    return run


def adapt(model: DiscreteRegistrationNet, fixed, moving, **kwargs) -> DiscreteRegistrationNet:
    """Run :func:`adapt_steps` to the end and return the adapted ``model``."""
    for _ in adapt_steps(model, fixed, moving, **kwargs):
        pass
    return model
