"""Save and load models: safetensors weights + JSON config in the file's metadata.

Never pickle: a checkpoint holds tensors and strings only, so loading one cannot
execute code. Anything that is not a napari-discreg safetensors file, or whose
config or tensors do not match the architecture, raises a :class:`ValueError`.
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

from .config import ModelConfig
from .model import DiscreteRegistrationNet, resolve_device

FORMAT = "napari-discreg"
FORMAT_VERSION = "1"
DEFAULT_WEIGHTS = "discreg_t1_t2_pd.safetensors"


def default_weights_path() -> Path:
    """Path of the pretrained model shipped inside the package."""
    return Path(str(resources.files("napari_discreg") / "weights" / DEFAULT_WEIGHTS))


def save_checkpoint(
    model: DiscreteRegistrationNet, path: str | os.PathLike, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (weights + config + optional JSON-able ``extra``) to ``path``.

    The file is written to a temporary name and renamed, so an interrupted save
    never leaves a truncated checkpoint behind.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(model.config.to_dict()),
        "extra": json.dumps(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


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
    """Load a model; ``path=None`` loads the pretrained model shipped with the package.

    Returns a new, independent model in eval mode on ``device`` (``None``: CUDA when
    available, else CPU).
    """
    p = Path(path) if path is not None else default_weights_path()
    if not p.is_file():
        raise ValueError(f"checkpoint {p} does not exist or is not a file")
    config, tensors, _ = _cached_checkpoint(str(p.resolve()), p.stat().st_mtime)
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
    return model.to(resolve_device(device)).eval()


def checkpoint_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The config and the ``extra`` metadata (training settings, metrics) of a checkpoint."""
    p = Path(path) if path is not None else default_weights_path()
    config, _, extra = read_checkpoint(p)
    return {"model_config": config.to_dict(), **extra}
