"""napari-discreg: learned discrete multimodal 2D registration, adapted by classifier discrepancy.

Public API (stable names; the GUI and the command line use only these):

* :func:`load_model` - the shipped pretrained model, or a checkpoint file.
* :func:`register` - register a moving image onto a fixed one -> :class:`RegistrationResult`
  (``method=`` one of :data:`METHODS`, default :data:`DEFAULT_METHOD`).
* :func:`adapt_steps` / :func:`adapt` - unsupervised adaptation to new contrasts
  (self-training on refined fields, or maximum classifier discrepancy with L1, sliced
  Wasserstein or projected EMD); ``steps.throw(StopAdaptation())`` ends a run after
  scoring its last iteration, ``steps.close()`` keeps the best weights scored so far.
* :func:`save_model` - write a (possibly adapted) model to a safetensors checkpoint.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("napari-discreg")  # written once, in pyproject.toml
except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
    __version__ = "0+unknown"

# name -> (module, attribute): imported on first use, so that ``import napari_discreg``
# (napari's plugin discovery, the CLI's --help) does not import torch
_LAZY: dict[str, tuple[str, str]] = {
    "BSplineConfig": (".core.config", "BSplineConfig"),
    "DEFAULT_METHOD": (".core.registration.methods", "DEFAULT_METHOD"),
    "METHODS": (".core.registration.methods", "METHODS"),
    "RefineConfig": (".core.config", "RefineConfig"),
    "RegistrationResult": (".core.registration.register", "RegistrationResult"),
    "StepRecord": (".core.learning.train", "StepRecord"),
    "StopAdaptation": (".core.learning.adapt", "StopAdaptation"),
    "adapt": (".core.learning.adapt", "adapt"),
    "adapt_steps": (".core.learning.adapt", "adapt_steps"),
    "load_model": (".core.files.checkpoint", "load_model"),
    "register": (".core.registration.register", "register"),
    "save_model": (".core.files.checkpoint", "save_checkpoint"),
}
_SUBPACKAGES = ("core", "runs", "cli")

__all__ = [
    "BSplineConfig",
    "DEFAULT_METHOD",
    "METHODS",
    "RefineConfig",
    "RegistrationResult",
    "StepRecord",
    "StopAdaptation",
    "adapt",
    "adapt_steps",
    "load_model",
    "register",
    "save_model",
]

if TYPE_CHECKING:  # pragma: no cover - what static tools see
    from .core.config import BSplineConfig, RefineConfig
    from .core.files.checkpoint import load_model
    from .core.files.checkpoint import save_checkpoint as save_model
    from .core.learning.adapt import StopAdaptation, adapt, adapt_steps
    from .core.learning.train import StepRecord
    from .core.registration.methods import DEFAULT_METHOD, METHODS
    from .core.registration.register import RegistrationResult, register


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attribute)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})
