"""napari-discreg: learned discrete multimodal 2D registration, adapted by classifier discrepancy.

Public API (stable names; the GUI and the command line use only these):

* :func:`load_model` - the shipped pretrained model, or a checkpoint file.
* :func:`register` - register a moving image onto a fixed one -> :class:`RegistrationResult`
  (``method=`` one of :data:`METHODS`, default :data:`DEFAULT_METHOD`).
* :func:`adapt_steps` / :func:`adapt` - unsupervised adaptation to new contrasts by
  maximum classifier discrepancy (L1, sliced Wasserstein or projected EMD).
* :func:`save_model` - write a (possibly adapted) model to a safetensors checkpoint.
"""

from importlib.metadata import PackageNotFoundError, version

from .core.adapt import adapt, adapt_steps
from .core.checkpoint import load_model
from .core.checkpoint import save_checkpoint as save_model
from .core.config import BSplineConfig, RefineConfig
from .core.register import DEFAULT_METHOD, METHODS, RegistrationResult, register
from .core.train import StepRecord

try:
    __version__ = version("napari-discreg")  # written once, in pyproject.toml
except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
    __version__ = "0+unknown"
__all__ = [
    "BSplineConfig",
    "DEFAULT_METHOD",
    "METHODS",
    "RefineConfig",
    "RegistrationResult",
    "StepRecord",
    "adapt",
    "adapt_steps",
    "load_model",
    "register",
    "save_model",
]
