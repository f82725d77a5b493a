"""Resumable run states (training and adaptation): weights, optimisers, progress and
random streams, in a safetensors file beside the model checkpoint format."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ..config import MAX_COUNT, AdaptConfig, parse_json
from ..learning.adapt import AdaptState, adaptation_optimizers
from ..learning.model import DiscreteRegistrationNet, resolve_device
from ..learning.self_train import trainable_parameters
from .checkpoint import (
    OPTIMIZER_PREFIX,
    STATE_PREFIX,
    _build_model,
    _model_metadata,
    _model_tensors,
    _write,
    read_checkpoint,
)

# ------------------------------------------------------------------ training states


@dataclass
class TrainingState:
    """What :func:`load_training_state` restored.

    Attributes
    ----------
    model : DiscreteRegistrationNet
        The model with the saved weights (the one passed in, or a new one).
    step : int
        Number of completed steps when the state was saved.
    extra : dict
        The JSON-able ``extra`` given to :func:`save_training_state`.
    optimizers : list of str
        Names of the optimisers whose state was loaded.
    tensors : dict of str to torch.Tensor
        The other tensors given to :func:`save_training_state` (CPU).
    """

    model: DiscreteRegistrationNet
    step: int
    extra: dict[str, Any]
    optimizers: list[str]
    tensors: dict[str, torch.Tensor]


def _number(value: Any, what: str) -> float:
    """``value`` as a finite float (a bool, a string or NaN raise ``ValueError``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {value!r}, not a number")
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    return float(value)


def _count(value: Any, what: str, high: float = MAX_COUNT) -> int:
    """``value`` as a whole number in ``[0, high]``, else ``ValueError``."""
    x = _number(value, what)
    if not x.is_integer() or not 0 <= x <= high:
        raise ValueError(f"{what} is {value!r}, not a whole number in [0, {high:g}]")
    return int(x)


_ADAM_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")


def check_optimizer(opt: torch.optim.Optimizer) -> None:
    """``ValueError`` unless ``opt``'s settings and (Adam) moments are sane: finite,
    non-negative hyper-parameters, betas in [0, 1), whole non-negative step counts and
    finite moments of the shape of their parameter (what a loaded state may not have)."""
    for i, group in enumerate(opt.param_groups):
        where = f"param group {i}"
        for key in ("lr", "eps", "weight_decay"):
            if key in group and _number(group[key], f"{where} {key}") < 0:
                raise ValueError(f"{where} {key} is {group[key]!r}, below 0")
        if "betas" in group:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"{where} betas are {betas!r}, not two numbers")
            if not all(0.0 <= _number(b, f"{where} beta") < 1.0 for b in betas):
                raise ValueError(f"{where} betas are {betas!r}, not in [0, 1)")
        for key in _ADAM_FLAGS:
            if key in group and not isinstance(group[key], bool):
                raise ValueError(f"{where} {key} is {group[key]!r}, not true or false")
        for key in ("foreach", "fused"):
            if group.get(key) is not None and not isinstance(group[key], bool):
                raise ValueError(f"{where} {key} is {group[key]!r}, not true, false or null")
    for param, entries in opt.state.items():
        for key, value in entries.items():
            if key == "step":
                _count(value, "an Adam step count", float(2**53))
            elif key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                    raise ValueError(
                        f"an Adam {key} has shape {shape}, not its parameter's {tuple(param.shape)}"
                    )
                if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                    raise ValueError(f"an Adam {key} is not finite")
                if key != "exp_avg" and bool((value < 0).any()):
                    raise ValueError(f"an Adam {key} is negative")


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, tuple):
        return [_json_value(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_json_value(v, where) for v in value]
    raise ValueError(
        f"cannot save {where} = {value!r} ({type(value).__name__}) in a training state"
    )


def save_training_state(
    path: str | os.PathLike,
    model: DiscreteRegistrationNet,
    optimizers: dict[str, torch.optim.Optimizer],
    step: int,
    extra: dict[str, Any] | None = None,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights, config, optimiser states and ``step`` to one safetensors file.

    Parameters
    ----------
    path : path-like
        The file (written to a temporary name and renamed: never left partial).
    model : DiscreteRegistrationNet
        The model (not a DistributedDataParallel wrapper: pass ``wrapper.module``).
    optimizers : dict of str to torch.optim.Optimizer
        Named optimisers (e.g. ``{"adam": opt}``); their tensors are stored under
        ``OPTIMIZER_PREFIX + name/...``, everything else as JSON metadata.
    step : int
        Completed steps.
    extra : dict, optional
        JSON-able run settings (training config, data paths...), as for
        :func:`save_checkpoint`.
    tensors : dict of str to torch.Tensor, optional
        More named tensors the run needs (given back by :func:`load_training_state`).
    weights : dict of str to torch.Tensor, optional
        Save these weights (a state dict of ``model``) instead of ``model``'s own.

    Returns
    -------
    pathlib.Path
        ``path``. The file is also a model checkpoint for :func:`load_model`.
    """
    path = Path(path)
    run_tensors = tensors or {}
    if weights is not None:
        expected = model.state_dict()
        if set(weights) != set(expected):
            raise ValueError("weights must be a state dict of the model")
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    else:
        tensors = _model_tensors(model)
    for name, value in run_tensors.items():
        tensors[STATE_PREFIX + name] = value.detach().cpu().contiguous()
    layout: dict[str, Any] = {}
    for name, opt in optimizers.items():
        if "/" in name or not name:
            raise ValueError(f"optimiser names must be non-empty and without '/', got {name!r}")
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, entries in sd["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{OPTIMIZER_PREFIX}{name}/{idx}/{key}"] = (
                        value.detach().cpu().contiguous()
                    )
                else:
                    scalars.setdefault(str(idx), {})[key] = _json_value(
                        value, f"{name} state {key}"
                    )
        groups = []
        for i, group in enumerate(sd["param_groups"]):
            plain = {}
            for key, value in group.items():
                if isinstance(value, torch.Tensor):  # e.g. a tensor learning rate
                    tensors[f"{OPTIMIZER_PREFIX}{name}/group{i}/{key}"] = value.detach().cpu()
                    plain[key] = {"__tensor__": True}
                else:
                    plain[key] = _json_value(value, f"{name} param group {key}")
            groups.append(plain)
        layout[name] = {
            "type": type(opt).__name__,
            "state_indices": [str(i) for i in sd["state"]],
            "scalars": scalars,
            "param_groups": groups,
        }
    metadata = _model_metadata(model, extra)
    metadata["training_state"] = json.dumps({"step": int(step), "optimizers": layout})
    _write(path, tensors, metadata)
    return path


def load_training_state(
    path: str | os.PathLike,
    model: DiscreteRegistrationNet | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    *,
    device=None,
) -> TrainingState:
    """Restore what :func:`save_training_state` wrote.

    Parameters
    ----------
    path : path-like
        A training state file.
    model : DiscreteRegistrationNet, optional
        Loaded in place (its config must equal the saved one); default: a new model
        built from the saved config, on ``device``.
    optimizers : dict of str to torch.optim.Optimizer, optional
        Optimisers over ``model``'s parameters, loaded in place by name. Build them
        *after* the model is on its device (their state follows the parameters).

    Raises
    ------
    ValueError
        Not a training state (e.g. a plain model checkpoint), a corrupt file, a
        model of another architecture, an optimiser the file has no state for, or
        one that does not match the saved parameter layout.
    """
    p = Path(path)
    config, tensors, extra = read_checkpoint(p)
    with safe_open(str(p), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get("training_state")
    if raw is None:
        raise ValueError(
            f"{p} is a model checkpoint without a training state (no optimiser or step); "
            "resume from the *.state.safetensors file that --checkpoint-every writes"
        )
    try:
        info = parse_json(raw, f"{p}: the training state")
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        step, layout = _count(info["step"], "step"), dict(info["optimizers"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{p}: the training state is corrupt ({exc})") from exc
    built = _build_model(config, tensors, p)
    if model is None:
        model = built.to(resolve_device(device))
    else:
        if model.config != config:
            raise ValueError(
                f"{p} holds a model with config {config.to_dict()}, not {model.config.to_dict()}"
            )
        model.load_state_dict(built.state_dict())
    restored = []
    for name, opt in (optimizers or {}).items():
        if name not in layout:
            raise ValueError(
                f"{p} has no state for optimiser {name!r} (it has {', '.join(layout) or 'none'})"
            )
        prefix = f"{OPTIMIZER_PREFIX}{name}/"
        try:
            entry = layout[name]
            if entry.get("type", type(opt).__name__) != type(opt).__name__:
                raise ValueError(f"it is {entry['type']!r}, not {type(opt).__name__}")
            state: dict[int, dict[str, Any]] = {}
            for idx in entry["state_indices"]:
                values: dict[str, Any] = dict(entry["scalars"].get(idx, {}))
                head = f"{prefix}{idx}/"
                values.update({k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)})
                state[int(idx)] = values
            groups = []
            for i, group in enumerate(entry["param_groups"]):
                g: dict[str, Any] = {}
                for key, value in group.items():
                    if isinstance(value, dict) and value.get("__tensor__"):
                        g[key] = tensors[f"{prefix}group{i}/{key}"]
                    elif isinstance(value, list) and key != "params":
                        g[key] = tuple(value)
                    else:
                        g[key] = value
                groups.append(g)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError(
                f"{p}: the training state is corrupt (optimiser {name!r}: {exc!r})"
            ) from exc
        try:
            opt.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise ValueError(
                f"{p}: the saved state of optimiser {name!r} does not fit the one given ({exc})"
            ) from exc
        try:
            check_optimizer(opt)
        except ValueError as exc:
            raise ValueError(
                f"{p}: the training state is corrupt (optimiser {name!r}: {exc})"
            ) from exc
        restored.append(name)
    run_tensors = {
        k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)
    }
    return TrainingState(
        model=model, step=step, extra=extra, optimizers=restored, tensors=run_tensors
    )


# -------------------------------------------------------------- adaptation states

BEST = "best/"
TORCH_RNG = "torch_rng"
PSEUDO_TARGETS = "pseudo_targets"


def save_adaptation_state(
    path: str | os.PathLike,
    model: DiscreteRegistrationNet,
    state,
    extra: dict[str, Any],
    *,
    running: bool,
) -> Path:
    """Write an :class:`~napari_discreg.core.learning.adapt.AdaptState` to ``path``.

    ``running``: the run is between two records (the model holds the current
    weights); otherwise it has ended and ``state.weights`` holds them. ``extra``
    must hold everything the run needs to continue (its settings); the step, best
    iteration and score are added under ``"adaptation_state"``.
    """
    weights = None if running else state.weights
    if not running and weights is None:
        raise ValueError(
            "the adaptation stopped inside an iteration; its weights are half-updated and "
            "cannot be resumed from (an earlier saved state can)"
        )
    extra = {
        **extra,
        "adaptation_state": {
            "step": state.step,
            "best_iteration": state.best_iteration,
            "best_score": state.best_score,
            "rng_state": state.rng_state,
            "pseudo_gain": state.pseudo_gain,
        },
    }
    run = {BEST + k: v for k, v in (state.best_weights or {}).items()}
    if state.torch_rng_state is not None:
        run[TORCH_RNG] = state.torch_rng_state
    if state.pseudo_targets is not None:
        run[PSEUDO_TARGETS] = state.pseudo_targets
    return save_training_state(
        path, model, state.optimizers, state.step, extra, tensors=run, weights=weights
    )


def _corrupt(path: Path, why: object) -> ValueError:
    """ "the adaptation state is corrupt (why)", once: a reason that is already the
    training state's "corrupt" message of this file gives only its own reason."""
    text = str(why)
    inner = f"{path}: the training state is corrupt ("
    if text.startswith(inner) and text.endswith(")"):
        text = text[len(inner) : -1]
    return ValueError(f"{path}: the adaptation state is corrupt ({text})")


def adaptation_record(path: str | os.PathLike, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``"adaptation_state"`` of a state's ``extra`` metadata, checked: whole step
    and best iteration with ``0 <= best_iteration <= step``, a finite best score and
    pseudo-label gain, random streams numpy can continue, and well-formed records of
    the run (``"adaptation"``, ``"adaptation_run"``).

    Raises
    ------
    ValueError
        ``extra`` holds no adaptation run ("holds no adaptation run to resume"), or a
        damaged one ("the adaptation state is corrupt (...)", one line).
    """
    p = Path(path)
    info = extra.get("adaptation_state")
    if not isinstance(info, dict):
        raise ValueError(
            f"{p} holds no adaptation run to resume; give the *.state.safetensors file that "
            "`napari-discreg adapt --checkpoint-every N` writes"
        )
    try:
        step = _count(info["step"], "step")
        best = _count(info["best_iteration"], "best_iteration", step)
        _number(info["best_score"], "best_score")
        if info.get("pseudo_gain") is not None:
            _number(info["pseudo_gain"], "pseudo_gain")
        rng_state = info.get("rng_state")
        if rng_state is not None:
            try:
                np.random.default_rng().bit_generator.state = rng_state
            except (TypeError, ValueError, KeyError, OverflowError) as exc:
                raise ValueError(f"rng_state is not a numpy PCG64 state ({exc})") from exc
        for key in ("adaptation", "adaptation_run"):
            if not isinstance(extra.get(key, {}), dict):
                raise ValueError(f"{key!r} is {type(extra[key]).__name__}, not a JSON object")
        record = extra.get("adaptation", {})
        if record.get("initial_criterion") is not None:
            _number(record["initial_criterion"], "the run's initial_criterion")
        if not isinstance(record.get("evaluation_before") or {}, dict):
            raise ValueError("the run's evaluation_before is not a JSON object")
        if record.get("config") is not None:
            AdaptConfig.from_dict(record["config"])
        for key, value in (("completed_steps", step), ("best_iteration", best)):
            if record.get(key) is not None and record[key] != value:
                raise ValueError(f"the run's {key} {record[key]!r} is not the state's {value}")
        run_steps = extra.get("adaptation_run", {}).get("steps")
        if run_steps is not None and _count(run_steps, "the run's steps") < step:
            raise ValueError(f"the run's steps {run_steps!r} are fewer than its step {step}")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise _corrupt(p, exc if not isinstance(exc, KeyError) else f"{exc} is missing") from exc
    return info


def load_adaptation_state(path: str | os.PathLike, lr: float, device=None):
    """(model with the current weights, AdaptState, extra) from :func:`save_adaptation_state`.

    Everything the run would use is checked first (:func:`adaptation_record`, the
    training state's step and optimisers with :func:`check_optimizer`, the best weights,
    the random streams, the pseudo-labels), so a damaged file fails here, in one line,
    rather than in the resumed run or, worse, by running on the damaged values.

    Raises
    ------
    ValueError
        Not an adaptation state (e.g. a model or a source-training state), or a corrupt
        one ("the adaptation state is corrupt (...)").
    """

    p = Path(path)
    config, _, extra = read_checkpoint(p)
    info = adaptation_record(p, extra)
    model = DiscreteRegistrationNet(config).to(resolve_device(device))
    recorded = extra.get("adaptation", {}).get("config")
    method = AdaptConfig.from_dict(recorded).method if isinstance(recorded, dict) else "mcd"
    optimizers: dict[str, torch.optim.Optimizer]
    if method == "self-training":
        optimizers = {"heads": torch.optim.Adam(trainable_parameters(model), lr=lr)}
    else:
        optimizers = adaptation_optimizers(model, lr)
    try:
        loaded = load_training_state(p, model, optimizers)
    except ValueError as exc:
        raise _corrupt(p, exc) from exc
    expected = model.state_dict()
    best = {k[len(BEST) :]: v for k, v in loaded.tensors.items() if k.startswith(BEST)}
    try:
        if loaded.step != int(info["step"]):
            raise ValueError(f"its step {info['step']} is not the training state's {loaded.step}")
        if set(best) != set(expected):
            raise ValueError("the best weights are missing or incomplete")
        for k, v in best.items():
            if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
                raise ValueError(f"the best weight {k} has shape {tuple(v.shape)}, {v.dtype}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"the best weight {k} is not finite")
        torch_rng = loaded.tensors.get(TORCH_RNG)
        if (torch_rng is None) != (info.get("rng_state") is None):
            raise ValueError("one of the two random streams (numpy, torch) is missing")
        if torch_rng is not None:
            try:
                torch.Generator().set_state(torch_rng)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ValueError(f"torch_rng is not a torch generator state ({exc})") from exc
        targets = loaded.tensors.get(PSEUDO_TARGETS)
        if method == "self-training" and targets is None:
            raise ValueError("the self-training run's pseudo-labels are missing")
        if targets is not None:
            k2 = config.num_labels**2
            if targets.ndim != 4 or targets.shape[-1] != k2 or not targets.is_floating_point():
                raise ValueError(f"the pseudo-labels have shape {tuple(targets.shape)}")
            if not bool(torch.isfinite(targets).all()) or bool((targets < 0).any()):
                raise ValueError("the pseudo-labels are not finite non-negative numbers")
        state = AdaptState(
            step=int(info["step"]),
            best_iteration=int(info["best_iteration"]),
            best_score=float(info["best_score"]),
            best_weights={k: v.to(next(model.parameters()).device) for k, v in best.items()},
            optimizers=optimizers,
            rng_state=info.get("rng_state"),
            torch_rng_state=torch_rng,
            pseudo_targets=targets,
            pseudo_gain=None if info.get("pseudo_gain") is None else float(info["pseudo_gain"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(p, exc) from exc
    return model, state, extra
