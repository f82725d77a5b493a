"""``register``: one fixed/moving pair in, a dense field and everything behind it out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import load_model
from .discrepancy import projected_emd
from .geometry import control_point_index, control_point_position
from .labels import argmax_label
from .model import DiscreteRegistrationNet, resolve_device
from .predict import predict_field
from .preprocess import check_pair, min_image_size, network_input
from .refine import RefineConfig, no_worse_than_identity, refine_field
from .warp import warp

_DEFAULT_MODELS: dict[str, DiscreteRegistrationNet] = {}


@dataclass
class RegistrationResult:
    """Output of :func:`register`.

    Attributes
    ----------
    displacement : ndarray, shape (2, H, W), float32
        Pixels, (row, col) order, same meaning as
        ``skimage.registration.optical_flow_tvl1``:
        ``warped(r, c) = moving(r + displacement[0, r, c], c + displacement[1, r, c])``.
    warped : ndarray, shape (H, W), float32
        The moving image (original intensities) warped onto the fixed image.
    probabilities : ndarray, shape (2, h, w, K, K), float32
        Displacement histogram of each head (F1, F2) at each control point; axis -2
        is the row displacement, axis -1 the column displacement.
    offsets : ndarray, shape (K,), float32
        Displacement in pixels of each bin along one axis.
    discrepancy : ndarray, shape (h, w), float32
        Projected Earth Mover's discrepancy between the heads per control point
        (marginals, in bins): high where the heads disagree, i.e. where the model is
        unsure on this kind of image.
    labels : ndarray, shape (h, w), int64
        Argmax label ``a * K + b`` of the mean histogram.
    stride : int
        Control-point spacing; control point ``(i, j)`` is at pixel
        ``((i + 0.5) * stride - 0.5, (j + 0.5) * stride - 0.5)``
        (:func:`~napari_discreg.core.geometry.control_point_position`).
    refine_steps : int
        Instance-optimisation steps applied to ``displacement`` after the network
        (0: the network's field as it is). ``probabilities``, ``discrepancy`` and
        ``labels`` are always the network's.
    identity_fallback : bool
        True when the network's field matched the pair worse than no motion (MIND-SSC
        distance, ``register(guard=True)``) and the zero field was used instead (as the
        refinement's start, with ``refine``).
    """

    displacement: np.ndarray
    warped: np.ndarray
    probabilities: np.ndarray
    offsets: np.ndarray
    discrepancy: np.ndarray
    labels: np.ndarray
    stride: int
    refine_steps: int = 0
    identity_fallback: bool = False

    def control_point(self, row: float, col: float) -> tuple[int, int]:
        """Index ``(i, j)`` of the control point whose block holds pixel ``(row, col)``."""
        return control_point_index(row, col, self.stride, self.discrepancy.shape)

    def control_point_position(self, i: int, j: int) -> tuple[float, float]:
        """Pixel coordinates of control point ``(i, j)``."""
        return control_point_position(i, j, self.stride)


def default_model(device=None) -> DiscreteRegistrationNet:
    """The shipped model, loaded once per device and kept for :func:`register`.

    Internal: :func:`load_model` gives callers their own copy to adapt.
    """
    dev = resolve_device(device)
    if str(dev) not in _DEFAULT_MODELS:
        _DEFAULT_MODELS[str(dev)] = load_model(None, dev)
    return _DEFAULT_MODELS[str(dev)]


def register(
    fixed,
    moving,
    *,
    model: DiscreteRegistrationNet | None = None,
    device=None,
    refine: bool | int | RefineConfig = False,
    guard: bool = True,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (2D images of the same shape).

    Parameters
    ----------
    fixed, moving : array_like, shape (H, W)
        Any real dtype; intensities are normalised internally (robust percentiles),
        images padded to a multiple of the control-point stride and the result
        cropped back to (H, W).
    model : DiscreteRegistrationNet, optional
        Default: the pretrained model shipped with the package.
    device : str or torch.device, optional
        ``None`` picks CUDA when available, else CPU. Defaults to the model's device
        when a model is given.
    refine : bool, int or RefineConfig
        After the network, optimise this pair's field directly (MIND-SSC similarity,
        diffusion regulariser; :func:`~napari_discreg.core.refine.refine_field`):
        ``True`` with the default :class:`~napari_discreg.core.refine.RefineConfig`,
        an int for that many steps, or a config. Default ``False``.
    guard : bool
        Keep the network's field only if it matches the pair better than no motion by
        the MIND-SSC distance; else use the zero field (``identity_fallback``). Default
        ``True``: a model meeting contrasts it does not know never makes the pair worse
        than not registering by that measure.

    Returns
    -------
    RegistrationResult

    Raises
    ------
    ValueError
        For images that are not 2D, differ in shape, hold NaN/inf, are constant or
        smaller than the label range needs.
    """
    if model is None:
        model = default_model(device)
        dev = next(model.parameters()).device
    else:
        dev = resolve_device(device) if device is not None else next(model.parameters()).device
        model = model.to(dev)
    rcfg = _refine_config(refine)
    cfg = model.config
    f, m = check_pair(
        fixed, moving, min_size=min_image_size(cfg.num_labels, cfg.capture_range, cfg.stride)
    )
    h, w = f.shape
    ft = network_input(f, cfg.stride, dev)
    mt = network_input(m, cfg.stride, dev)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dense, _, probs = predict_field(model, ft, mt)
        fallback = False
        if guard:  # judged on the image itself, not its padding
            _, use_zero = no_worse_than_identity(
                ft[..., :h, :w],
                mt[..., :h, :w],
                dense[..., :h, :w],
                radius=rcfg.radius,
                dilation=rcfg.dilation,
            )
            fallback = bool(use_zero[0])
            if fallback:
                dense = torch.zeros_like(dense)
        if rcfg.steps:
            dense = refine_field(ft, mt, dense, rcfg)
        with torch.no_grad():
            dense = dense[..., :h, :w]
            moving_raw = torch.from_numpy(m)[None, None].to(dev)
            warped = warp(moving_raw, dense)[0, 0]
            probs = probs[:, 0]  # (2, h, w, K, K)
            disc = projected_emd(probs[0], probs[1], reduction="none")
            labels = argmax_label(probs.mean(0))
    finally:
        model.train(was_training)
    return RegistrationResult(
        displacement=dense[0].cpu().numpy().astype(np.float32),
        warped=warped.cpu().numpy().astype(np.float32),
        probabilities=probs.cpu().numpy().astype(np.float32),
        offsets=model.offsets.cpu().numpy().astype(np.float32),
        discrepancy=disc.cpu().numpy().astype(np.float32),
        labels=labels.cpu().numpy(),
        stride=cfg.stride,
        refine_steps=rcfg.steps,
        identity_fallback=fallback,
    )


def _refine_config(refine: bool | int | RefineConfig) -> RefineConfig:
    if isinstance(refine, RefineConfig):
        return refine
    if isinstance(refine, bool):
        return RefineConfig() if refine else RefineConfig(steps=0)
    if isinstance(refine, int):
        if refine < 0:
            raise ValueError(f"refine must be >= 0 steps, got {refine}")
        return RefineConfig(steps=refine)
    raise TypeError(f"refine must be a bool, an int or a RefineConfig, got {type(refine).__name__}")
