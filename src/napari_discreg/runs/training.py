"""A source-training run: a new model trained on synthetic mono-modal pairs, from plain
values (:class:`TrainingSpec`) to the trained model and its metadata record.

The pairs come from the user's images (folders/files, with a held-out evaluation at
the end) or the MNI template. A run can save a resumable state every N steps and
continue a saved one; under torchrun each process trains on its shard of the slices
(:mod:`.core.learning.distributed`).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..core.config import DataConfig, FolderConfig, ModelConfig, TrainConfig
from ..core.data.folders import PairBatches, PairMaker, evaluate_pairs, make_pairs, split_holdout
from ..core.files.checkpoint import read_checkpoint
from ..core.files.resume import load_training_state, save_training_state
from ..core.files.transaction import make_dirs
from ..core.learning import train as core_train
from ..core.learning.distributed import (
    DistContext,
    all_reduce_mean,
    ddp_source_loss,
    max_weight_difference,
)
from ..core.learning.model import DiscreteRegistrationNet
from ..core.learning.train import StepRecord, template_batches
from ..core.memory import MemoryEstimate, check_memory, training_bytes
from ..core.threads import use_threads_for_load
from .base import (
    Messages,
    Run,
    RunOptions,
    SettingError,
    context_for,
    contradiction,
    jsonable,
    load_folder,
    path_list,
    state_file,
)


@dataclass(frozen=True)
class TrainingSpec(RunOptions):
    """Everything a source-training run needs, as plain values.

    Attributes
    ----------
    model_config, config, data_config, folder_config
        Architecture, training, synthetic-pair and folder settings.
    source : paths or None
        The user's images (one contrast); ``None``: the MNI template.
    skip_bad, allow_mixed_shapes, workers
        How the user's folders are read (see ``napari-discreg train --help``).
    device, context
        The process context (:func:`~napari_discreg.core.learning.distributed.init_distributed`);
        without one a single process on ``device``.
    checkpoint_every, state_path
        Save a resumable state to ``state_path`` every N steps and at the end.
    resume : path or None
        A training state to continue: architecture, settings and data come from it
        (``source``, ``checkpoint_every``, ``skip_bad`` and ``allow_mixed_shapes`` may
        be given anew; the other settings here are not used).
    command : str or None
        The command line to record.
    log, warn : callable or None
        Where messages and warnings go (main process only).
    """

    model_config: ModelConfig = field(default_factory=ModelConfig)
    config: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class TrainingProgress:
    """One training step: the core record, with its losses averaged over the processes."""

    record: StepRecord
    losses: dict[str, float]

    @property
    def iteration(self) -> int:
        return self.record.iteration

    @property
    def total(self) -> int:
        return self.record.total


@dataclass
class TrainingResult:
    """What a finished or closed run gives.

    ``metadata`` is the record a checkpoint of ``model`` carries (``"training"``,
    ``"command"``, ``"napari_discreg_version"``); ``evaluation`` (held-out pairs of the
    user's images) is ``None`` without one; ``state_path`` is the state file the run
    keeps (``None`` without ``checkpoint_every`` or ``resume``).
    """

    model: DiscreteRegistrationNet
    metadata: dict[str, Any]
    evaluation: dict[str, Any] | None
    interrupted: bool
    state_path: Path | None
    start_step: int
    completed_steps: int
    total_steps: int
    losses: dict[str, float]
    weight_difference: float | None
    runtime_s: float
    state_error: str | None = None


def _refuse_contradictions(spec: TrainingSpec, saved: dict[str, Any]) -> None:
    """A resumed run continues the saved one: a setting given here that is not its
    default and differs from the saved run's is refused, as a resumed adaptation refuses
    it (its learning-rate schedule spans the saved run's steps, so they cannot change)."""
    defaults = TrainingSpec()
    for name, saved_config in saved.items():
        given, default = getattr(spec, name), getattr(defaults, name)
        for f in fields(given):
            value, was = getattr(given, f.name), getattr(saved_config, f.name)
            if value != getattr(default, f.name) and value != was:
                raise contradiction(f.name, spec.resume, was)


def resolve_training(spec: TrainingSpec) -> TrainingSpec:
    """The spec of the run to do: with ``resume``, the saved run's architecture and
    settings (``source``, ``checkpoint_every``, ``skip_bad`` and ``allow_mixed_shapes``
    given here win; any other setting given here that contradicts the saved run is
    refused); the source paths made absolute otherwise."""
    if not spec.resume:
        source = path_list(spec.source)
        return replace(spec, source=[str(Path(s).resolve()) for s in source] if source else None)
    mcfg, _, saved = read_checkpoint(spec.resume)
    run = saved.get("training")
    if not isinstance(run, dict) or "folder_config" not in run:
        raise SettingError(
            f"{spec.resume}: holds no training run to resume; give the *.state.safetensors "
            "file that a training run saves with {checkpoint_every}"
        )
    names = TrainConfig.__dataclass_fields__
    tdict = {k: v for k, v in run.items() if k in names}
    tdict["source_contrasts"] = tuple(tdict.get("source_contrasts", ()))
    saved_configs = {
        "model_config": mcfg,
        "config": TrainConfig(**tdict),
        "data_config": DataConfig.from_dict(run["data_config"]),
        "folder_config": FolderConfig.from_dict(run["folder_config"]),
    }
    _refuse_contradictions(spec, saved_configs)
    return replace(
        spec,
        **saved_configs,
        source=path_list(spec.source) or run.get("source"),
        checkpoint_every=spec.checkpoint_every or run.get("checkpoint_every"),
        skip_bad=spec.skip_bad or bool(run.get("skip_bad")),
        allow_mixed_shapes=spec.allow_mixed_shapes or bool(run.get("allow_mixed_shapes")),
    )


def run_training(spec: TrainingSpec) -> Run[TrainingProgress, TrainingResult]:
    """Prepare the run of ``spec`` and return it as a generator of progress records.

    Preparing (resolving the spec, building the model, restoring a resumed state,
    reading the source) happens here, so bad input raises before the first record.
    The returned :class:`~napari_discreg.runs.base.Run` yields a
    :class:`TrainingProgress` per step and returns a :class:`TrainingResult`;
    ``run.close()`` (or a Ctrl-C while it runs) stops after the step in progress,
    saves the state when asked and returns the result.
    """
    spec = resolve_training(spec)
    ctx = context_for(spec.context, spec.device)
    say = Messages(spec.log, spec.warn, ctx.is_main)
    mcfg, tcfg, dcfg, fcfg = spec.model_config, spec.config, spec.data_config, spec.folder_config
    torch.manual_seed(tcfg.seed)  # reproducible initial weights (the same on every rank)
    model = DiscreteRegistrationNet(mcfg).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    start_step = 0
    if spec.resume:
        start_step = load_training_state(spec.resume, model, {"adam": opt}).step
        say.info(f"resuming {spec.resume} after step {start_step} of {tcfg.steps}")

    source_info: dict[str, Any] = {"data": "MNI template (nilearn)"}
    maker, val_idx, batches = None, np.zeros(0, dtype=np.int64), None
    if spec.source:
        ds = load_folder(
            spec.source,
            name="source",
            size=dcfg.size,
            folder_config=fcfg,
            skip_bad=spec.skip_bad,
            allow_mixed_shapes=spec.allow_mixed_shapes,
            say=say,
        )
        train_idx, val_idx, how = split_holdout(ds, fcfg.val_fraction, tcfg.seed)
        maker = PairMaker(ds, config=dcfg)
        batches = PairBatches(
            maker,
            train_idx,
            batch_size=tcfg.batch_size,
            seed=tcfg.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
        ).iterate(start_step, device=ctx.device, workers=spec.workers)
        source_info = {
            "data": ds.describe(),
            "files": [str(f) for f in ds.used_files],
            "skipped": [str(b) for b in ds.bad],
            "training_slices": int(train_idx.size),
            "held_out": how,
        }
        say.info(f"  {how}")
    else:
        # the template: batch s of rank r from default_rng([seed, r, s]), so a resumed
        # run continues the very stream of an uninterrupted one (and ranks differ)
        batches = template_batches(
            dcfg,
            tcfg.batch_size,
            tcfg.source_contrasts,
            tcfg.seed,
            ctx.device,
            rank=ctx.rank,
            start_step=start_step,
            augment=tcfg.contrast_augmentation,
        )
    if ctx.distributed:
        say.info(
            f"data-parallel: {ctx.describe()}; {tcfg.batch_size} pairs per process and step "
            f"({tcfg.batch_size * ctx.world_size} in all)"
        )
    state_path = state_file(spec.checkpoint_every, spec.state_path, spec.resume)
    evaluation_pairs = None
    if maker is not None and val_idx.size and fcfg.eval_pairs:
        evaluation_pairs = (maker, val_idx)
    body = _train(
        spec,
        ctx,
        model=model,
        optimizer=opt,
        batches=batches,
        start_step=start_step,
        source_info=source_info,
        evaluation_pairs=evaluation_pairs,
        state_path=state_path,
    )
    return Run(body, start_step=start_step, total=tcfg.steps, spec=spec, context=ctx)


def _train(
    spec: TrainingSpec,
    ctx: DistContext,
    *,
    model: DiscreteRegistrationNet,
    optimizer: torch.optim.Optimizer,
    batches,
    start_step: int,
    source_info: dict[str, Any],
    evaluation_pairs: tuple[PairMaker, np.ndarray] | None,
    state_path: Path | None,
) -> Generator[TrainingProgress, None, TrainingResult]:
    tcfg, every = spec.config, spec.checkpoint_every
    settings = {
        "source": spec.source,
        "checkpoint_every": spec.checkpoint_every,
        "skip_bad": spec.skip_bad,
        "allow_mixed_shapes": spec.allow_mixed_shapes,
    }
    # refuse a run that cannot fit before its first step, not in the middle of it
    size = int(spec.data_config.size)
    check_memory(
        MemoryEstimate(
            training_bytes(model.config, (size, size), tcfg.batch_size),
            f"training on {size} x {size} px pairs, batches of {tcfg.batch_size}",
        ),
        limit_gb=spec.max_memory_gb,
        hint="use a smaller size or a smaller batch, or raise the memory limit",
    )
    use_threads_for_load(spec.threads)
    completed, interrupted = start_step, False
    last: dict[str, float] = {}
    history: list[tuple[int, float]] = []
    sync: float | None = None
    start = time.perf_counter()

    def record_extra(completed: int, interrupted: bool, elapsed: float) -> dict:
        return {
            "training": {
                **tcfg.to_dict(),
                "data_config": spec.data_config.to_dict(),
                "folder_config": spec.folder_config.to_dict(),
                **settings,
                "source_data": source_info,
                "completed_steps": completed,
                "interrupted": interrupted,
                "final_loss": last.get("loss"),
                "final_accuracy": last.get("accuracy"),
                "loss_curve": downsample(history),
                "device": str(ctx.device),
                "distributed": {
                    "world_size": ctx.world_size,
                    "backend": ctx.backend,
                    "pairs_per_step": tcfg.batch_size * ctx.world_size,
                    "max_weight_difference": sync,
                },
                "resumed_from": str(spec.resume) if spec.resume else None,
                "runtime_s": elapsed,
            },
            "command": spec.command,
            "napari_discreg_version": __version__,
        }

    state_error: str | None = None

    def save_state(completed: int, interrupted: bool) -> None:
        """Write the state (main process); a failed write (e.g. a full disk) is a warning,
        the previous state stays, the run goes on and the result reports it."""
        nonlocal state_error
        if ctx.is_main and state_path is not None:
            make_dirs(state_path.parent)
            extra = jsonable(record_extra(completed, interrupted, time.perf_counter() - start))
            try:
                save_training_state(state_path, model, {"adam": optimizer}, completed, extra)
            except OSError as exc:
                state_error = str(exc)
                Messages(spec.log, spec.warn, True).warning(
                    f"training state after step {completed} not saved: {exc}"
                )
            else:
                state_error = None

    # looked up here, not imported: the command-line tests replace core.learning.train.train_steps
    steps = core_train.train_steps(
        model,
        config=tcfg,
        data_config=spec.data_config,
        batches=batches,
        device=ctx.device,
        optimizer=optimizer,
        start_step=start_step,
        loss_fn=ddp_source_loss(model, ctx) if ctx.distributed else None,
    )
    try:
        for record in steps:
            logs = all_reduce_mean(record.losses, ctx)
            completed, last = record.iteration, logs
            history.append((completed, logs["loss"]))
            if every and completed % every == 0 and completed < tcfg.steps:
                save_state(completed, False)
            yield TrainingProgress(record, logs)
    except (KeyboardInterrupt, GeneratorExit):
        interrupted = True
        steps.close()
    model.eval()
    elapsed = time.perf_counter() - start

    evaluation = None
    if not interrupted:
        if ctx.distributed:
            sync = max_weight_difference(model, ctx)
        if ctx.is_main and evaluation_pairs is not None:
            maker, val_idx = evaluation_pairs
            pairs = make_pairs(
                maker, val_idx, spec.folder_config.eval_pairs, seed=tcfg.seed, stream=(1,)
            )
            evaluation = {**evaluate_pairs(model, pairs), "pairs": len(pairs)}
    extra = record_extra(completed, interrupted, elapsed)
    extra["training"]["evaluation"] = evaluation
    save_state(completed, interrupted)
    return TrainingResult(
        model=model,
        metadata=jsonable(extra),
        evaluation=evaluation,
        interrupted=interrupted,
        state_path=state_path,
        start_step=start_step,
        completed_steps=completed,
        total_steps=tcfg.steps,
        losses=last,
        weight_difference=sync,
        runtime_s=elapsed,
        state_error=state_error,
    )


def downsample(history: list[tuple[int, float]], points: int = 200) -> list[list[float]]:
    """At most ``points`` (step, loss) pairs, evenly spread, the last one included."""
    if len(history) <= points:
        return [[s, v] for s, v in history]
    idx = np.unique(np.linspace(0, len(history) - 1, points).round().astype(int))
    return [[history[i][0], history[i][1]] for i in idx]
