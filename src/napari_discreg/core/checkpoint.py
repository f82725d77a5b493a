"""Save and load models: safetensors weights + JSON config in the file's metadata.

Never pickle: a checkpoint holds tensors and strings only, so loading one cannot
execute code. Anything that is not a napari-discreg safetensors file, or whose
config or tensors do not match the architecture, raises a :class:`ValueError`.

A *training state* (:func:`save_training_state`) is a model checkpoint plus what a
run needs to continue: the optimisers' tensors (Adam moments, step counts) stored
as more safetensors tensors under names starting with ``OPTIMIZER_PREFIX``, their
non-tensor parts (hyper-parameters, param-group layout) and the step as JSON in the
metadata, and any other named tensors the run needs under ``STATE_PREFIX``.
:func:`load_model` ignores both, so a training state is also a usable model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import SHIPPED_MODELS, ModelConfig
from .model import DiscreteRegistrationNet, resolve_device

FORMAT = "napari-discreg"
FORMAT_VERSION = "1"
DEFAULT_WEIGHTS = SHIPPED_MODELS["default"][0]
OPTIMIZER_PREFIX = "__optimizer__/"
"""Tensor names of a training state's optimiser tensors start with this (never a
model parameter name)."""
STATE_PREFIX = "__state__/"
"""Names of a training state's other tensors (e.g. the best weights of an adaptation)."""


def default_weights_path() -> Path:
    """Path of the pretrained model shipped inside the package."""
    return shipped_model_path("default")


def shipped_model_path(name: str) -> Path:
    """Path of the shipped model ``name`` (a key of :data:`SHIPPED_MODELS`)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(
            f"no shipped model {name!r}; the shipped models are {list(SHIPPED_MODELS)}"
        )
    return Path(str(resources.files("napari_discreg") / "weights" / SHIPPED_MODELS[name][0]))


def checkpoint_path(source: str | os.PathLike | None) -> Path:
    """The checkpoint file ``source`` names: ``None`` the default shipped model, a key of
    :data:`SHIPPED_MODELS` that shipped model (unless a file of that name exists), else
    a path."""
    if source is None:
        return default_weights_path()
    if isinstance(source, str) and source in SHIPPED_MODELS and not Path(source).is_file():
        return shipped_model_path(source)
    return Path(source)


def save_checkpoint(
    model: DiscreteRegistrationNet, path: str | os.PathLike, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (weights + config + optional JSON-able ``extra``) to ``path``.

    The file is written to a temporary name and renamed, so an interrupted save
    never leaves a truncated checkpoint behind.
    """
    path = Path(path)
    _write(path, _model_tensors(model), _model_metadata(model, extra))
    return path


def _model_tensors(model: DiscreteRegistrationNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _model_metadata(model: DiscreteRegistrationNet, extra: dict[str, Any] | None) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(model.config.to_dict()),
        "extra": json.dumps(extra or {}),
    }


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors file written to a temporary name and renamed (never a partial file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(
    path: str | os.PathLike,
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a checkpoint: (config, tensors, extra)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint ({exc}); napari-discreg only "
            "loads .safetensors files it wrote (pickled .pt/.pth files are refused)"
        ) from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a napari-discreg checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {meta.get('format_version')!r}; this "
            f"napari-discreg reads version {FORMAT_VERSION}"
        )
    try:
        config = ModelConfig.from_dict(json.loads(meta["model_config"]))
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise ValueError(
            f"{path}: the model config in the checkpoint is missing or corrupt ({exc})"
        ) from exc
    return config, tensors, extra


@lru_cache(maxsize=8)
def _cached_checkpoint(path: str, mtime: float):
    return read_checkpoint(path)


def load_model(path: str | os.PathLike | None = None, device=None) -> DiscreteRegistrationNet:
    """Load a model: a checkpoint file, or a shipped model by name.

    ``path=None`` loads the default pretrained model shipped with the package; a key of
    :data:`SHIPPED_MODELS` (``"default"``, ``"t1-to-t2"``, ``"t1-to-pd"``, ``"mono"``)
    loads that shipped model. Returns a new, independent model in eval mode on
    ``device`` (``None``: CUDA when available, else CPU).
    """
    p = checkpoint_path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint {p} does not exist or is not a file")
    config, tensors, _ = _cached_checkpoint(str(p.resolve()), p.stat().st_mtime)
    return _build_model(config, tensors, p).to(resolve_device(device)).eval()


def _build_model(
    config: ModelConfig, tensors: dict[str, torch.Tensor], p: Path
) -> DiscreteRegistrationNet:
    """A new model with ``tensors`` (the run's tensors of a training state ignored)."""
    tensors = {
        k: v for k, v in tensors.items() if not k.startswith((OPTIMIZER_PREFIX, STATE_PREFIX))
    }
    model = DiscreteRegistrationNet(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{p} does not fit the napari-discreg architecture for its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )
    model.load_state_dict(tensors)
    return model


def checkpoint_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The config and the ``extra`` metadata (training settings, metrics) of a checkpoint
    (a path, a shipped model's name, or ``None`` for the default one)."""
    p = checkpoint_path(path)
    config, _, extra = read_checkpoint(p)
    return {"model_config": config.to_dict(), **extra}


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
        info = json.loads(raw)
        step, layout = int(info["step"]), dict(info["optimizers"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
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


def save_adaptation_state(
    path: str | os.PathLike,
    model: DiscreteRegistrationNet,
    state,
    extra: dict[str, Any],
    *,
    running: bool,
) -> Path:
    """Write an :class:`~napari_discreg.core.train.AdaptState` to ``path``.

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
        },
    }
    run = {BEST + k: v for k, v in (state.best_weights or {}).items()}
    if state.torch_rng_state is not None:
        run[TORCH_RNG] = state.torch_rng_state
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
    from .train import AdaptState, adaptation_optimizers

    p = Path(path)
    config, _, extra = read_checkpoint(p)
    info = extra.get("adaptation_state")
    if not isinstance(info, dict):
        raise ValueError(
            f"{p} holds no adaptation run to resume; give the *.state.safetensors file that "
            "`napari-discreg adapt --checkpoint-every N` writes"
        )
    model = DiscreteRegistrationNet(config).to(resolve_device(device))
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
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{p}: the adaptation state is corrupt ({exc})") from exc
    return model, state, extra
