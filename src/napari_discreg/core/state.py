"""Resumable run states (training and adaptation): weights, optimisers, progress and
random streams, in a safetensors file beside the model checkpoint format."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .adapt import AdaptState, adaptation_optimizers
from .checkpoint import (
    OPTIMIZER_PREFIX,
    STATE_PREFIX,
    _build_model,
    _model_metadata,
    _model_tensors,
    _write,
    read_checkpoint,
)
from .config import MAX_COUNT, AdaptConfig, parse_json
from .model import DiscreteRegistrationNet, resolve_device
from .self_train import trainable_parameters

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
        step, layout = int(info["step"]), dict(info["optimizers"])
        if not 0 <= step <= MAX_COUNT:
            raise ValueError(f"step {step} is out of range")
    except (KeyError, TypeError, ValueError) as exc:
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
        entry = layout[name]
        prefix = f"{OPTIMIZER_PREFIX}{name}/"
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
        try:
            opt.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(
                f"{p}: the saved state of optimiser {name!r} does not fit the one given ({exc})"
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
    """Write an :class:`~napari_discreg.core.adapt.AdaptState` to ``path``.

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


def load_adaptation_state(path: str | os.PathLike, lr: float, device=None):
    """(model with the current weights, AdaptState, extra) from :func:`save_adaptation_state`.

    Raises
    ------
    ValueError
        Not an adaptation state (e.g. a model or a source-training state) or a corrupt one.
    """

    p = Path(path)
    config, _, extra = read_checkpoint(p)
    info = extra.get("adaptation_state")
    if not isinstance(info, dict):
        raise ValueError(
            f"{p} holds no adaptation run to resume; give the *.state.safetensors file that "
            "`napari-discreg adapt --checkpoint-every N` writes"
        )
    model = DiscreteRegistrationNet(config).to(resolve_device(device))
    recorded = extra.get("adaptation", {}).get("config")
    method = AdaptConfig.from_dict(recorded).method if isinstance(recorded, dict) else "mcd"
    optimizers: dict[str, torch.optim.Optimizer]
    if method == "self-training":
        optimizers = {"heads": torch.optim.Adam(trainable_parameters(model), lr=lr)}
    else:
        optimizers = adaptation_optimizers(model, lr)
    loaded = load_training_state(p, model, optimizers)
    best = {k[len(BEST) :]: v for k, v in loaded.tensors.items() if k.startswith(BEST)}
    if set(best) != set(model.state_dict()):
        raise ValueError(f"{p}: the best weights of the adaptation state are missing or corrupt")
    try:
        state = AdaptState(
            step=int(info["step"]),
            best_iteration=int(info["best_iteration"]),
            best_score=float(info["best_score"]),
            best_weights={k: v.to(next(model.parameters()).device) for k, v in best.items()},
            optimizers=optimizers,
            rng_state=info.get("rng_state"),
            torch_rng_state=loaded.tensors.get(TORCH_RNG),
            pseudo_targets=loaded.tensors.get(PSEUDO_TARGETS),
            pseudo_gain=None if info.get("pseudo_gain") is None else float(info["pseudo_gain"]),
        )
        if method == "self-training" and state.pseudo_targets is None:
            raise ValueError("the self-training run's pseudo-labels are missing")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{p}: the adaptation state is corrupt ({exc})") from exc
    return model, state, extra
