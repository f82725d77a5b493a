"""An adaptation run: MCD adaptation of a model to unlabelled target pairs, from plain
values (:class:`AdaptationSpec`) to the adapted model and its metadata record.

Targets come from arrays, ready-made pair files, folders of a second contrast (paired
subject by subject, with a held-out evaluation, or unpaired) or built-in demo pairs;
the labelled source from folders of the user's images or the MNI template. A run can
save a resumable state every N iterations and continue a saved one; under torchrun
each process adapts on its shard of the target pairs (:mod:`.core.learning.distributed`).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import napari_discreg

from .. import __version__
from ..core.config import AdaptConfig, TrainConfig
from ..core.data.folders import PairBatches, PairMaker, PairSet, evaluate_pairs
from ..core.files.checkpoint import checkpoint_info
from ..core.files.resume import load_adaptation_state, save_adaptation_state
from ..core.files.transaction import make_dirs
from ..core.learning.adapt import AdaptState, StopAdaptation, holdout_split, snapshot_weights
from ..core.learning.distributed import (
    DistContext,
    average_gradients,
    broadcast_module,
    max_weight_difference,
)
from ..core.learning.model import DiscreteRegistrationNet
from ..core.learning.train import StepRecord, source_batches
from ..core.memory import adaptation_estimate, check_memory
from ..core.registration.predict import identity_criterion, prepare_target
from ..core.registration.register import network_stage_distance
from ..core.threads import use_threads_for_load
from .adaptation_spec import (
    RUN_KEYS,
    AdaptationSpec,
    absolute_settings,
    resolve_adaptation,
    run_settings,
)
from .base import (
    Messages,
    Run,
    SettingError,
    context_for,
    jsonable,
    load_base_model,
    load_folder,
    state_file,
)
from .targets import (
    ArrayTargets,
    DemoTargets,
    FolderTargets,
    PairFiles,
    TargetOptions,
    check_target_options,
    load_targets,
    read_targets,
)

__all__ = [
    "RUN_KEYS",
    "AdaptationProgress",
    "AdaptationResult",
    "AdaptationSpec",
    "ArrayTargets",
    "DemoTargets",
    "FolderTargets",
    "PairFiles",
    "TargetOptions",
    "check_target_options",
    "read_targets",
    "resolve_adaptation",
    "run_adaptation",
    "run_settings",
]


@dataclass(frozen=True)
class AdaptationProgress:
    """One record of a run: the core :class:`~napari_discreg.core.learning.train.StepRecord`
    (the first one is the starting iteration, with the initial criterion) and the run's
    best iteration so far, its criterion and the latest criterion evaluated."""

    record: StepRecord
    best_iteration: int
    best_criterion: float | None
    criterion: float | None

    @property
    def iteration(self) -> int:
        return self.record.iteration

    @property
    def total(self) -> int:
        return self.record.total

    @property
    def discrepancy(self) -> float | None:
        return self.record.discrepancy


@dataclass
class AdaptationResult:
    """What a finished, closed or diverged run gives.

    ``metadata`` is the record a checkpoint of ``model`` carries (``"adaptation"``,
    ``"base_model_info"``, ``"command"``, ``"napari_discreg_version"``); ``model`` holds
    the best weights by the criterion. ``evaluation`` (held-out pairs before and after,
    with ground truth) is ``None`` without one (unpaired or array targets, or an
    interrupted run); ``state_path`` is the state file the run keeps (``None`` without
    ``checkpoint_every`` or ``resume``) and ``state_saved`` whether it was written at
    the end (it is not when the run failed inside an iteration).

    The criteria (``initial_criterion`` at the start, ``best_criterion`` of the kept
    weights) are scored on ``selection_pairs`` target pairs; ``held_out`` says they were
    set aside and never adapted on (``AdaptConfig.holdout``), and ``identity_criterion``
    is the score of no registration on the same pairs. The kept weights never score
    below the start there: a run that finds nothing better keeps the starting weights.
    """

    model: DiscreteRegistrationNet
    metadata: dict[str, Any]
    evaluation_before: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    interrupted: bool
    diverged: str | None
    state_path: Path | None
    state_saved: bool
    start_step: int
    completed_steps: int
    total_steps: int
    best_iteration: int
    initial_criterion: float | None
    best_criterion: float | None
    weight_difference: float | None
    runtime_s: float
    state_error: str | None = None
    selection_pairs: int = 0
    held_out: bool = False
    identity_criterion: float | None = None
    pseudo_gain: float | None = None
    min_pseudo_gain: float = 0.0
    #: the registered pairs' check (:attr:`ArrayTargets.registered`): ``"iteration"`` the
    #: candidate, ``"start"`` and ``"candidate"`` the pairs' mean MIND-SSC distance after
    #: registering them with either weights, ``"kept"`` whether the candidate was kept
    pair_check: dict[str, Any] | None = None

    @property
    def nothing_to_learn(self) -> bool:
        """Self-training found its refined fields barely better than the model's own."""
        return self.pseudo_gain is not None and self.pseudo_gain < self.min_pseudo_gain

    def note(self) -> str:
        """Why a self-training run learned nothing (empty otherwise)."""
        if not self.nothing_to_learn:
            return ""
        return (
            f"Nothing to learn: on these pairs the refined fields match the images only "
            f"{100 * (self.pseudo_gain or 0.0):.0f} % better (MIND-SSC) than the model's own "
            f"(self-training needs {100 * self.min_pseudo_gain:.0f} %): the model already "
            "does what instance optimisation would teach it, so it is kept as it is."
        )

    @property
    def unchanged(self) -> bool:
        """True when the run kept its starting weights (no iteration scored better, or
        the best one registered the pairs no better: :attr:`pair_check`)."""
        return self.best_iteration == self.start_step == 0

    def pair_check_text(self) -> str:
        """What registering the pairs again said of the best iteration (empty without
        a check)."""
        check = self.pair_check
        if not check:
            return ""
        compare = (
            f"MIND-SSC distance {check['candidate']:.4f} with iteration {check['iteration']} "
            f"against {check['start']:.4f} with the start, lower is better"
        )
        if check["kept"]:
            return (
                f"Registering the pair again with the kept weights matches it better ({compare})."
            )
        return (
            f"Iteration {check['iteration']} scored best by the selection criterion, but "
            f"registering the pair again with it matched no better ({compare}), so the "
            "starting weights are kept."
        )

    def selection_text(self) -> str:
        """How the kept weights were judged, in one or two sentences: on which pairs, the
        criterion at the start, of the kept weights and of no registration."""
        init, best = self.initial_criterion, self.best_criterion
        if init is None or best is None or not self.selection_pairs:
            return ""
        criterion = self.metadata.get("adaptation", {}).get("selection_criterion", "mind")
        where = (
            f"{self.selection_pairs} held-out target pair(s), not adapted on"
            if self.held_out
            else f"{self.selection_pairs} of the target pairs adapted on (too few to hold any out)"
        )
        kept = "start" if self.unchanged else f"iteration {self.best_iteration}"
        text = (
            f"Judged on {where}, by the {criterion} criterion (higher is better): start "
            f"{init:.4f}, kept ({kept}) {best:.4f}"
        )
        ident = self.identity_criterion
        if ident is None:
            return text + "."
        text += f", no registration {ident:.4f}."
        if best < ident:
            text += (
                " The kept weights still score below no registration on these pairs: "
                "Register may fall back to the unregistered image."
            )
        return text


# ----------------------------------------------------------- settings and resume


def run_adaptation(spec: AdaptationSpec) -> Run[AdaptationProgress, AdaptationResult]:
    """Prepare the run of ``spec`` and return it as a generator of progress records.

    Preparing (resolving the spec, reading the targets and the source, loading the
    model or the resumed state, the evaluation before) happens here, so bad input
    raises ``ValueError``/``OSError`` before the first record. The returned
    :class:`~napari_discreg.runs.base.Run` yields an :class:`AdaptationProgress` per
    record of :func:`napari_discreg.adapt_steps` (the first at ``run.start_step``) and
    returns an :class:`AdaptationResult`. ``run.close()`` (or a Ctrl-C while it runs)
    stops after a complete iteration, keeps the best weights, saves the state when
    asked and returns the result; a diverged run ends the same way with ``diverged``
    set.
    """
    spec = resolve_adaptation(spec)
    ctx = context_for(spec.context, spec.device)
    say = Messages(spec.log, spec.warn, ctx.is_main)
    cfg, dcfg, fcfg = spec.config, spec.data_config, spec.folder_config
    fixed, moving, target, folder = load_targets(
        spec.targets,  # type: ignore[arg-type]
        source=spec.source,
        data_config=dcfg,
        folder_config=fcfg,
        seed=cfg.seed,
        skip_bad=spec.skip_bad,
        allow_mixed_shapes=spec.allow_mixed_shapes,
        ctx=ctx,
        say=say,
        max_memory_gb=spec.max_memory_gb,
    )
    total_pairs = int(fixed.shape[0]) * (ctx.world_size if folder else 1)
    if ctx.distributed and not folder and fixed.shape[0] >= ctx.world_size:
        fixed, moving = fixed[ctx.rank :: ctx.world_size], moving[ctx.rank :: ctx.world_size]

    eval_pairs: PairSet | None = folder.get("evaluation_pairs")
    state = AdaptState()
    criteria: dict[int, float] = {}
    if spec.resume:
        model, state, saved = load_adaptation_state(spec.resume, cfg.lr, ctx.device)
        record = saved.get("adaptation", {})
        model_desc, base_info = record.get("base_model"), saved.get("base_model_info", {})
        before = record.get("evaluation_before") if ctx.is_main else None
        if record.get("initial_criterion") is not None:
            criteria[0] = record["initial_criterion"]
        criteria[state.best_iteration] = float(state.best_score)
        say.info(f"resuming {spec.resume} after iteration {state.step} of {cfg.steps}")
    else:
        model, model_desc = load_base_model(spec.model, ctx.device)
        if isinstance(spec.model, DiscreteRegistrationNet):
            base_info = {}
        else:
            base_info = checkpoint_info(spec.model)
            base_info.pop("model_config", None)
        before = (
            evaluate_pairs(model, eval_pairs) if ctx.is_main and eval_pairs is not None else None
        )
    start_step = state.step
    selection = _selection_summary(fixed, moving, model, cfg) if ctx.is_main else {}

    source_desc = "MNI template, T1/T2-like/PD-like mono-modal pairs"
    source = None
    if spec.source:
        src = load_folder(
            spec.source,
            name="source",
            size=dcfg.size,
            folder_config=fcfg,
            skip_bad=spec.skip_bad,
            allow_mixed_shapes=spec.allow_mixed_shapes,
            say=say,
        )
        held_f, held_s = folder.get("held_files", set()), folder.get("held_slices", set())
        keep = [
            i
            for i in range(len(src))
            if src.files[src.file_index[i]] not in held_f
            and (src.files[src.file_index[i]], int(src.slice_index[i])) not in held_s
        ]
        if not keep:
            raise SettingError(
                "every source slice belongs to the held-out target subjects; give more files "
                "or {val_fraction} 0"
            )
        source = PairBatches(
            PairMaker(src, config=dcfg),
            keep,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
        ).iterate(start_step, device=ctx.device, workers=spec.workers)
        source_desc = f"{src.describe()} ({len(keep)} slices used), mono-modal pairs"
    elif ctx.distributed:
        rng = np.random.default_rng([cfg.seed, ctx.rank, start_step])
        source = source_batches(
            dcfg,
            cfg.batch_size,
            TrainConfig.source_contrasts,
            rng,
            ctx.device,
            augment=cfg.source_augmentation,
        )
    broadcast_module(model, ctx)

    state_path = state_file(spec.checkpoint_every, spec.state_path, spec.resume)
    body = _adapt(
        spec,
        ctx,
        model=model,
        state=state,
        fixed=fixed,
        moving=moving,
        source=source,
        criteria=criteria,
        eval_pairs=eval_pairs,
        before=before,
        info={
            "target": target,
            "target_pairs": total_pairs,
            "source": source_desc,
            "base_model": model_desc,
            "base_model_info": base_info,
            "folder": folder,
        },
        state_path=state_path,
        selection=selection,
    )
    return Run(body, start_step=start_step, total=cfg.steps, spec=spec, context=ctx)


def _adapt(
    spec: AdaptationSpec,
    ctx: DistContext,
    *,
    model: DiscreteRegistrationNet,
    state: AdaptState,
    fixed: np.ndarray,
    moving: np.ndarray,
    source,
    criteria: dict[int, float],
    eval_pairs: PairSet | None,
    before: dict | None,
    info: dict[str, Any],
    state_path: Path | None,
    selection: dict[str, Any],
) -> Generator[AdaptationProgress, None, AdaptationResult]:
    cfg, folder, every = spec.config, info["folder"], spec.checkpoint_every
    start_step = state.step
    # refuse a run that cannot fit before its first iteration, not in the middle of it
    side = max(int(spec.data_config.size), *(int(n) for n in np.shape(fixed)[-2:]))
    check_memory(
        adaptation_estimate(model.config, (side, side), cfg.batch_size),
        limit_gb=spec.max_memory_gb,
        hint="use smaller images or a smaller batch, or raise the memory limit",
    )
    use_threads_for_load(spec.threads)
    registered = getattr(spec.targets, "registered", ())
    # the registered pairs judge the kept weights against these (a fresh run's start)
    start_weights = (
        snapshot_weights(model) if registered and start_step == 0 and not ctx.distributed else None
    )
    # looked up here, not imported: napari_discreg.adapt_steps is the public name
    # (the command-line tests replace it)
    steps = napari_discreg.adapt_steps(
        model,
        fixed,
        moving,
        discrepancy=spec.kind,
        config=cfg,
        data_config=spec.data_config,
        source=source,
        device=ctx.device,
        state=state,
        should_stop=spec.should_stop,
    )
    completed, best_iter, interrupted, diverged = start_step, state.best_iteration, False, None
    sync: float | None = None
    pair_check: dict[str, Any] | None = None
    start = time.perf_counter()

    def record_extra(elapsed: float, evaluation: dict | None = None) -> dict[str, Any]:
        return {
            "adaptation": {
                "discrepancy": spec.kind.value,
                "steps": cfg.steps,
                "completed_steps": completed,
                "best_iteration": best_iter,
                "selection_criterion": cfg.criterion,
                "initial_criterion": criteria.get(0),
                "best_criterion": criteria.get(best_iter),
                "config": cfg.to_dict(),
                "data_config": spec.data_config.to_dict(),
                "folder_config": spec.folder_config.to_dict() if (folder or spec.source) else None,
                "target": info["target"],
                "target_pairs": info["target_pairs"],
                "pairing": folder.get("pairing"),
                "pairing_note": folder.get("pairing_note") or None,
                "skipped": folder.get("skipped", []),
                "source": info["source"],
                "evaluation": evaluation,
                "evaluation_before": before,
                "selection": selection,
                "base_model": info["base_model"],
                "resumed_from": str(spec.resume) if spec.resume else None,
                "interrupted": interrupted,
                "diverged": diverged,
                "device": str(ctx.device),
                "distributed": {
                    "world_size": ctx.world_size,
                    "backend": ctx.backend,
                    "max_weight_difference": sync,
                },
                "runtime_s": elapsed,
                "pair_check": pair_check,
            },
            "base_model_info": info["base_model_info"],
            "command": spec.command,
            "napari_discreg_version": __version__,
        }

    state_error: str | None = None

    def save_state(running: bool) -> bool:
        """Write the resumable state (main process); False if the run cannot be resumed.

        A failed write (e.g. a full disk) is a warning: the previous state stays, the run
        goes on and the result reports it (``state_error``)."""
        nonlocal state_error
        if not ctx.is_main or state_path is None:
            return False
        if not running and state.weights is None:
            return False
        make_dirs(state_path.parent)
        extra = record_extra(time.perf_counter() - start)
        extra["adaptation_run"] = {**absolute_settings(run_settings(spec)), "steps": cfg.steps}
        try:
            save_adaptation_state(state_path, model, state, jsonable(extra), running=running)
        except OSError as exc:
            state_error = str(exc)
            Messages(spec.log, spec.warn, True).warning(
                f"adaptation state after iteration {state.step} not saved: {exc}"
            )
            return False
        state_error = None
        return True

    try:
        with average_gradients(model, ctx):
            for record in steps:
                if record.criterion is not None:
                    criteria[record.iteration] = record.criterion
                if record.best_iteration is not None:
                    best_iter = record.best_iteration
                if record.iteration != start_step:
                    completed = record.iteration
                    if every and completed % every == 0 and completed < cfg.steps:
                        save_state(running=True)
                yield AdaptationProgress(
                    record,
                    best_iter,
                    criteria.get(best_iter),
                    criteria[max(criteria)] if criteria else None,
                )
    except (KeyboardInterrupt, GeneratorExit):
        interrupted = True
        try:  # a stop asked for: the last complete iteration is a candidate too
            steps.throw(StopAdaptation())
        except (StopIteration, StopAdaptation):
            pass  # ended: the best weights are restored
        finally:
            steps.close()
    except FloatingPointError as exc:
        diverged = str(exc)  # the generator has restored the best weights
    if spec.should_stop is not None and spec.should_stop():
        interrupted = True  # adapt_steps returned early: a stop inside an iteration
    # a stop scores the last complete iteration after the last record: the state knows
    if state.best_score is not None and state.best_iteration != best_iter:
        best_iter = state.best_iteration
        criteria[best_iter] = float(state.best_score)
    if start_weights is not None and best_iter != 0:
        pair_check = check_on_registered_pairs(model, start_weights, registered, best_iter)
        if not pair_check["kept"]:
            best_iter = 0
            state.best_iteration, state.best_weights = 0, start_weights
            state.best_score = criteria.get(0, state.best_score)
    elapsed = time.perf_counter() - start

    if ctx.distributed and not (interrupted or diverged):
        # every rank kept the best weights by its own criterion: rank 0's choice wins
        broadcast_module(model, ctx)
        sync = max_weight_difference(model, ctx)
    evaluation = None
    if before is not None and eval_pairs is not None and not interrupted:
        after = evaluate_pairs(model, eval_pairs)
        evaluation = {
            "pairs": len(eval_pairs),
            "held_out": folder["held_out"],
            "identity": before["identity"],
            "before": before["model"],
            "after": after["model"],
        }
    extra = jsonable(record_extra(elapsed, evaluation))
    saved = save_state(running=False)
    return AdaptationResult(
        model=model,
        metadata=extra,
        evaluation_before=before,
        evaluation=evaluation,
        interrupted=interrupted,
        diverged=diverged,
        state_path=state_path,
        state_saved=saved,
        start_step=start_step,
        completed_steps=completed,
        total_steps=cfg.steps,
        best_iteration=best_iter,
        initial_criterion=criteria.get(0),
        best_criterion=criteria.get(best_iter),
        weight_difference=sync,
        runtime_s=elapsed,
        state_error=state_error,
        selection_pairs=int(selection.get("pairs", 0)),
        held_out=bool(selection.get("held_out", False)),
        identity_criterion=selection.get("identity"),
        pseudo_gain=state.pseudo_gain,
        min_pseudo_gain=cfg.min_pseudo_gain,
        pair_check=pair_check,
    )


def check_on_registered_pairs(
    model: DiscreteRegistrationNet,
    start_weights: dict[str, torch.Tensor],
    registered,
    iteration: int,
) -> dict[str, Any]:
    """Register each ``(fixed, moving, affine)`` pair again with the model's weights
    (the run's best) and with ``start_weights``; the model ends on the best weights when
    they match the pairs better on average (:func:`network_stage_distance`), else on
    the start. Returns the :attr:`AdaptationResult.pair_check` record."""
    best = snapshot_weights(model)

    def distance() -> float:
        return float(np.mean([network_stage_distance(model, f, m, a) for f, m, a in registered]))

    was_training = model.training
    model.eval()
    try:
        candidate = distance()
        model.load_state_dict(start_weights)
        at_start = distance()
        kept = candidate < at_start
        if kept:
            model.load_state_dict(best)
    finally:
        model.train(was_training)
    return {
        "iteration": int(iteration),
        "pairs": len(registered),
        "start": at_start,
        "candidate": candidate,
        "kept": bool(kept),
    }


def _selection_summary(
    fixed: np.ndarray, moving: np.ndarray, model: DiscreteRegistrationNet, cfg: AdaptConfig
) -> dict[str, Any]:
    """Which target pairs judge the weights (as :func:`~napari_discreg.core.learning.adapt.adapt_steps`
    splits them) and the criterion of no registration on them."""
    n = int(np.shape(fixed)[0])
    adapt_on, held = holdout_split(n, cfg.holdout, cfg.seed)
    f, m, mask = prepare_target(fixed[held], moving[held], model.config.stride, torch.device("cpu"))
    return {
        "pairs": len(held),
        "adapted_on": len(adapt_on),
        "held_out": len(adapt_on) < n,
        "criterion": cfg.criterion,
        "identity": identity_criterion(f, m, mask, cfg.criterion),
    }
