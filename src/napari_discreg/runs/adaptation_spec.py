"""What an adaptation run is to do: :class:`AdaptationSpec`, and how a resumed run's
saved settings are merged with the ones given (:func:`resolve_adaptation`: the saved run
wins, a contradiction is refused, the data may have moved).

The run itself is :mod:`napari_discreg.runs.adaptation`.
"""

from __future__ import annotations

__all__ = ["RUN_KEYS", "AdaptationSpec", "absolute_settings", "resolve_adaptation", "run_settings"]

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.config import AdaptConfig
from ..core.files.checkpoint import read_checkpoint
from ..core.files.resume import adaptation_record
from ..core.learning.discrepancy import Discrepancy
from ..core.learning.model import DiscreteRegistrationNet
from .base import (
    ModelSource,
    PathLike,
    RunOptions,
    SettingError,
    contradiction,
    path_list,
)
from .targets import (
    ArrayTargets,
    TargetOptions,
    Targets,
    check_target_options,
)

# ------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class AdaptationSpec(RunOptions):
    """Everything an adaptation run needs, as plain values.

    Attributes
    ----------
    targets : ArrayTargets, PairFiles, FolderTargets, DemoTargets or TargetOptions
        The unlabelled target pairs; ``None`` only when resuming (the saved run's).
    model : path, shipped model name, DiscreteRegistrationNet or None
        The model to adapt (an in-memory one is copied first); ``None``: the default
        shipped model. Ignored when resuming (the state holds the model).
    source : paths or None
        Labelled source images (one contrast); ``None``: the MNI template.
    discrepancy : Discrepancy or str
        A :class:`~napari_discreg.core.learning.discrepancy.Discrepancy` or a name it parses,
        parsed here, once (``ValueError`` for an unknown name).
    config, data_config, folder_config
        Adaptation, synthetic-pair and folder settings (``folder_config.target_pairs``
        pairs are made from folder targets).
    steps : int or None
        Iterations of the whole run; ``None``: ``config.steps``, or when resuming the
        saved run's (a larger number extends it).
    skip_bad, allow_mixed_shapes, workers
        How the user's folders are read (see ``napari-discreg adapt --help``).
    device, context
        The process context (:func:`~napari_discreg.core.learning.distributed.init_distributed`);
        without one a single process on ``device``.
    checkpoint_every, state_path
        Save a resumable state to ``state_path`` every N iterations and at the end.
    resume : path or None
        A state to continue; the saved run's settings are restored, and a setting given
        here that contradicts them is refused.
    command : str or None
        The command line to record.
    log, warn : callable or None
        Where messages and warnings go (main process only).
    should_stop : callable or None
        Checked between the passes inside an iteration (``adapt_steps(should_stop=)``):
        when it returns True the run ends within one pass, the iteration in progress is
        undone and the run closes as after a Ctrl-C (best weights kept, state saved).
    """

    targets: Targets | None = None
    model: ModelSource = None
    discrepancy: Discrepancy | str = Discrepancy.PEMD
    config: AdaptConfig = field(default_factory=AdaptConfig)
    steps: int | None = None
    should_stop: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "discrepancy", Discrepancy.parse(self.discrepancy))

    @property
    def kind(self) -> Discrepancy:
        """The discrepancy, as parsed."""
        return Discrepancy.parse(self.discrepancy)  # a member already: returned as it is


RUN_KEYS = (
    "model",
    "source",
    "target",
    "target_fixed",
    "target_moving",
    "unpaired",
    "target_pairs",
    "demo_target",
    "method",
    "discrepancy",
    "lr",
    "batch_size",
    "seed",
    "size",
    "axis",
    "skip_bad",
    "allow_mixed_shapes",
    "min_foreground",
    "val_fraction",
    "eval_pairs",
    "checkpoint_every",
)
"""The settings (``adapt`` options) a resumable state records and a resume restores."""
_DATA_KEYS = ("source", "target", "target_fixed", "target_moving")
_PATH_KEYS = ("model", *_DATA_KEYS)
_TARGET_KEYS = ("target", "target_fixed", "target_moving", "unpaired", "demo_target")


def _fspath(path: PathLike | None) -> str | None:
    return None if path is None else os.fspath(path)


def run_settings(spec: AdaptationSpec) -> dict[str, Any]:
    """The spec's settings under :data:`RUN_KEYS`, as the command line gives them."""
    opts = (
        TargetOptions()
        if spec.targets is None or isinstance(spec.targets, ArrayTargets)
        else spec.targets.options()
    )
    model = None if isinstance(spec.model, DiscreteRegistrationNet) else _fspath(spec.model)
    fc = spec.folder_config
    return {
        "model": model,
        "source": path_list(spec.source),
        "target": path_list(opts.target),
        "target_fixed": _fspath(opts.target_fixed),
        "target_moving": _fspath(opts.target_moving),
        "unpaired": opts.unpaired,
        "target_pairs": fc.target_pairs,
        "demo_target": opts.demo_target,
        "method": spec.config.method,
        "discrepancy": spec.kind.value,
        "lr": spec.config.lr,
        "batch_size": spec.config.batch_size,
        "seed": spec.config.seed,
        "size": spec.data_config.size,
        "axis": fc.axis,
        "skip_bad": spec.skip_bad,
        "allow_mixed_shapes": spec.allow_mixed_shapes,
        "min_foreground": fc.min_foreground,
        "val_fraction": fc.val_fraction,
        "eval_pairs": fc.eval_pairs,
        "checkpoint_every": spec.checkpoint_every,
    }


def absolute_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the paths made absolute, as a state records them."""

    def absolute(value):
        if value is None:
            return None
        if isinstance(value, list):
            return [str(Path(v).resolve()) for v in value]
        return str(Path(value).resolve())

    return {k: absolute(v) if k in _PATH_KEYS else v for k, v in settings.items()}


def _saved_settings(
    spec: AdaptationSpec, given: dict[str, Any]
) -> tuple[dict[str, Any], int, AdaptConfig | None]:
    """The settings, steps and adaptation config of the run saved in ``spec.resume``; a
    setting of ``spec`` that contradicts the saved run is an error (the run would not be
    the same)."""
    assert spec.resume is not None
    _, _, extra = read_checkpoint(spec.resume)
    saved = extra.get("adaptation_run")
    if saved is not None and "adaptation_state" in extra:
        info = adaptation_record(spec.resume, extra)  # a damaged state: "corrupt", one line
    if not isinstance(saved, dict) or "adaptation_state" not in extra:
        raise SettingError(
            f"{spec.resume}: holds no adaptation run to resume; give the *.state.safetensors "
            "file that an adaptation run saves with {checkpoint_every}"
        )
    defaults = run_settings(AdaptationSpec())
    saved = {"method": "mcd", **saved}  # a run saved before self-training existed was MCD
    given_abs = absolute_settings(given)
    settings = {}
    for key in RUN_KEYS:
        value = saved.get(key, defaults.get(key))
        if key in ("checkpoint_every", *_DATA_KEYS) and given[key]:
            settings[key] = given[key]  # may change (the data may have moved)
            continue
        if given[key] != defaults.get(key) and given_abs[key] != value:
            raise contradiction(key, spec.resume, value)
        settings[key] = value
    steps = int(saved.get("steps", 0)) if spec.steps is None else spec.steps
    done = int(info["step"])
    if steps < done:
        raise SettingError(
            f"{spec.resume} is at iteration {done}; {{steps}} must be at least that (it "
            "counts the iterations of the whole run)"
        )
    # the saved run's whole AdaptConfig (n, criterion, select_every, ...), so that a run
    # resumed after the defaults changed continues with the settings it started with
    recorded = extra.get("adaptation", {}).get("config")
    config = AdaptConfig.from_dict(recorded) if isinstance(recorded, dict) else None
    return settings, steps, config


def resolve_adaptation(spec: AdaptationSpec) -> AdaptationSpec:
    """The spec of the run to do: with ``resume``, the saved run's settings merged in
    (one given here that contradicts them is refused), ``steps`` set, the targets
    checked (as :class:`TargetOptions`, or the arrays given). Resolving a resolved spec
    gives it back."""
    settings, steps, base = run_settings(spec), spec.steps, spec.config
    if spec.resume:
        settings, steps, saved_config = _saved_settings(spec, settings)
        base = saved_config or spec.config
        try:
            return _resolved(spec, settings, steps, base)
        except (TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ValueError) and not isinstance(exc, _BadSavedSetting):
                raise  # e.g. a target folder that is gone: said as it is
            raise ValueError(
                f"{spec.resume}: the adaptation state is corrupt (its settings: {exc})"
            ) from exc
    return _resolved(spec, settings, steps, base)


class _BadSavedSetting(ValueError):
    """A saved setting that does not make a config (raised by :func:`_resolved`)."""


def _resolved(
    spec: AdaptationSpec, settings: dict[str, Any], steps: int | None, base: AdaptConfig
) -> AdaptationSpec:
    if steps is not None and steps < 0:
        raise SettingError(f"{{steps}} must be >= 0, got {steps}")
    steps = base.steps if steps is None else steps
    arrays = isinstance(spec.targets, ArrayTargets)
    if arrays:
        targets: Targets = spec.targets  # type: ignore[assignment]
    else:
        targets = TargetOptions(**{k: settings[k] for k in _TARGET_KEYS})
        check_target_options(targets, settings["source"])
    s = settings
    try:
        config = replace(
            base,
            method=s["method"],
            steps=steps,
            lr=s["lr"],
            batch_size=s["batch_size"],
            seed=s["seed"],
        )
        data_config = replace(spec.data_config, size=s["size"])
        folder_config = replace(
            spec.folder_config,
            axis=s["axis"],
            min_foreground=s["min_foreground"],
            val_fraction=s["val_fraction"],
            eval_pairs=s["eval_pairs"],
            target_pairs=s["target_pairs"],
        )
    except (TypeError, ValueError) as exc:
        raise _BadSavedSetting(str(exc)) from exc
    return replace(
        spec,
        targets=targets,
        model=spec.model if isinstance(spec.model, DiscreteRegistrationNet) else s["model"],
        source=s["source"],
        discrepancy=s["discrepancy"],
        config=config,
        data_config=data_config,
        folder_config=folder_config,
        steps=steps,
        skip_bad=s["skip_bad"],
        allow_mixed_shapes=s["allow_mixed_shapes"],
        checkpoint_every=s["checkpoint_every"],
    )


# --------------------------------------------------------------------------- run
