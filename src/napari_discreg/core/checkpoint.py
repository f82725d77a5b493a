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
    :data:`SHIPPED_MODELS` (``"default"``, ``"mono"``)
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
