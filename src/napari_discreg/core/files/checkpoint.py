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

import hashlib
import json
import math
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..config import SHIPPED_MODELS, ModelConfig, parse_json
from ..learning.model import DiscreteRegistrationNet, expected_state_shapes, resolve_device
from .atomic import replace_atomically

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
    """safetensors file written all-or-nothing (:func:`~napari_discreg.core.files.atomic.replace_atomically`:
    a unique temporary name, fsync, rename; the previous file intact on any failure).

    The file is serialised in memory and written by Python, so a full disk is an
    :class:`OSError` (``ENOSPC``) naming ``path`` and the bytes needed, never a
    ``SafetensorError``.
    """
    data = save(tensors, metadata=metadata)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    replace_atomically(path, write, nbytes=len(data))


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
"""safetensors dtypes a model weight may have (the shipped models are F32)."""
MAX_PARAMETERS = 50_000_000
"""Most weights a checkpoint's architecture may have (200 MB as float32; the shipped
models have about 0.2 M)."""


def read_checkpoint(
    path: str | os.PathLike,
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a checkpoint: (config, tensors, extra).

    Validated before any tensor is read or any model built: the metadata's JSON (nesting
    bounded), the config's types and ranges (:class:`ModelConfig`: bounded K, features,
    channels, stride, temperature, capture range), the number of weights the config
    implies, and every weight's name, shape and dtype from the safetensors header
    against the shapes the config implies (computed on the ``meta`` device). Then the
    tensors are read and every floating-point tensor must be finite. Anything else
    raises ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            header = {}
            for k in f.keys():
                sl = f.get_slice(k)
                header[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            config, extra = _checked_metadata(path, meta)
            _check_header(path, config, header)
            tensors = {k: f.get_tensor(k) for k in header}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint ({exc}); napari-discreg only "
            "loads .safetensors files it wrote (pickled .pt/.pth files are refused)"
        ) from exc
    bad = sorted(
        k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    )
    if bad:
        raise ValueError(
            f"{path}: tensor(s) {bad[:3]} hold NaN or infinite values; the model is broken "
            "(retrain it, or use an earlier checkpoint)"
        )
    return config, tensors, extra


def _checked_metadata(path: Path, meta: dict[str, str]) -> tuple[ModelConfig, dict[str, Any]]:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a napari-discreg checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {meta.get('format_version')!r}; this "
            f"napari-discreg reads version {FORMAT_VERSION}"
        )
    if "model_config" not in meta:
        raise ValueError(f"{path}: the model config in the checkpoint is missing")
    where = f"{path}: the model config in the checkpoint"
    raw = parse_json(meta["model_config"], where)
    try:
        config = ModelConfig.from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where} is invalid ({exc})") from exc
    extra = parse_json(meta.get("extra", "{}"), f"{path}: the checkpoint's extra metadata")
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: the checkpoint's extra metadata is not a JSON object")
    return config, extra


def _check_fit(path: Path, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """The model tensors' names and shapes (``found``) against the architecture's."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != found[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit the napari-discreg architecture for its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )


def _check_header(path: Path, config: ModelConfig, header: dict[str, tuple]) -> None:
    """The model tensors' names, shapes and dtypes against those ``config`` implies."""
    expected = expected_state_shapes(config)
    count = sum(math.prod(s) for s in expected.values())
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"{path}: its config {config.to_dict()} implies {count:,} weights, more than the "
            f"{MAX_PARAMETERS:,} napari-discreg loads"
        )
    model = {k: v for k, v in header.items() if not k.startswith((OPTIMIZER_PREFIX, STATE_PREFIX))}
    _check_fit(path, expected, {k: tuple(v[0]) for k, v in model.items()})
    dtypes = sorted(f"{k}: {v[1]}" for k, v in model.items() if v[1] not in FLOAT_DTYPES)
    if dtypes:
        raise ValueError(
            f"{path}: weights must be floating point ({', '.join(FLOAT_DTYPES)}); got "
            f"{', '.join(dtypes[:3])}"
        )


@lru_cache(maxsize=8)
def _cached_checkpoint(path: str, digest: str):
    return read_checkpoint(path)


def _content_digest(path: Path) -> str:
    """SHA-256 of the file's bytes: the cache key. A checkpoint replaced with the same
    modification time (``cp -p``, ``rsync -a``) must not load the old weights; hashing a
    shipped model (a few MB) takes milliseconds."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    config, tensors, _ = _cached_checkpoint(str(p.resolve()), _content_digest(p))
    return _build_model(config, tensors, p).to(resolve_device(device)).eval()


def _build_model(
    config: ModelConfig, tensors: dict[str, torch.Tensor], p: Path
) -> DiscreteRegistrationNet:
    """A new model with ``tensors`` (the run's tensors of a training state ignored)."""
    tensors = {
        k: v for k, v in tensors.items() if not k.startswith((OPTIMIZER_PREFIX, STATE_PREFIX))
    }
    model = DiscreteRegistrationNet(config)
    _check_fit(
        p,
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in tensors.items()},
    )
    model.load_state_dict(tensors)
    return model


def checkpoint_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The config and the ``extra`` metadata (training settings, metrics) of a checkpoint
    (a path, a shipped model's name, or ``None`` for the default one)."""
    p = checkpoint_path(path)
    config, _, extra = read_checkpoint(p)
    return {"model_config": config.to_dict(), **extra}
