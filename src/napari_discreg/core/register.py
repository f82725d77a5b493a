"""``register``: one fixed/moving pair in, a dense field and everything behind it out.

One pipeline serves the API, the CLI and the napari widget: :data:`DEFAULT_METHOD`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .bspline import bspline_refine, level_schedule
from .checkpoint import load_model
from .config import BSplineConfig, RefineConfig
from .discrepancy import projected_emd
from .geometry import control_point_index, control_point_position
from .labels import argmax_label
from .memory import ENV_LIMIT, check_memory, register_estimate
from .model import DiscreteRegistrationNet, mode_independent, resolve_device
from .predict import predict_field
from .preprocess import check_pair, min_image_size, network_input
from .refine import no_worse_than_identity, refine_field, refine_step_count
from .warp import warp

_DEFAULT_MODELS: dict[str, DiscreteRegistrationNet] = {}

METHODS: dict[str, str] = {
    "bspline": "B-spline Gauss-Newton on MIND-SSC (the default: most accurate, fastest)",
    "network": "the network's field alone",
    "network+bspline": "the network's field, refined by B-spline Gauss-Newton",
    "network+adam": "the network's field, refined by Adam on a dense grid",
}
"""Every registration method by name, with a one-line description."""

DEFAULT_METHOD = "bspline"
"""What ``register()``, ``napari-discreg register`` and the Register widget run unless
told otherwise (measured against elastix in docs/benchmarks.md, "Speed")."""


class NetworkOutputs:
    """The network's histograms for one pair, computed once, on first use.

    The ``"bspline"`` method does not need the network for the field; its histograms,
    head discrepancy and labels (the inspector's view) are computed when first read, on
    the thread that reads them.
    """

    def __init__(self, model, fixed, moving) -> None:
        self._inputs = (model, fixed, moving)
        self._values: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_arrays(cls, probabilities, discrepancy, labels) -> NetworkOutputs:
        """Outputs already computed (e.g. a result rebuilt from saved arrays)."""
        out = cls(None, None, None)
        out._values = (np.asarray(probabilities), np.asarray(discrepancy), np.asarray(labels))
        return out

    def set(self, probs: torch.Tensor) -> None:
        self._values = _summarise(probs)
        self._inputs = None  # type: ignore[assignment]

    def get(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            if self._values is None:
                model, ft, mt = self._inputs
                _, _, probs = _run_network(model, ft, mt)
                self.set(probs)
            assert self._values is not None
            return self._values


def _summarise(probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities (2, h, w, K, K), discrepancy (h, w), labels (h, w)) as NumPy."""
    with torch.no_grad():
        probs = probs[:, 0]
        disc = projected_emd(probs[0], probs[1], reduction="none")
        labels = argmax_label(probs.mean(0))
    return (
        probs.cpu().numpy().astype(np.float32),
        disc.cpu().numpy().astype(np.float32),
        labels.cpu().numpy(),
    )


def _run_network(model, ft, mt):
    """The network on padded inputs, under ``torch.inference_mode``.

    The model's train/eval mode is left alone (switching it is not thread-safe: another
    thread may be training or registering with the same model): the architecture
    computes the same in both modes (:func:`~napari_discreg.core.model.mode_independent`),
    which :func:`register` checks.
    """
    with torch.inference_mode():
        return predict_field(model, ft, mt)


class CaptureRangeWarning(UserWarning):
    """The network's field looks unreliable because the motion may exceed its capture range."""


CAPTURE_EDGE_FRACTION = 0.05
"""Warn when at least this share of the foreground control points have their most
probable label on the outermost ring of the K x K grid (the capture range)."""
CAPTURE_MIN_PEAK = 0.15
"""... or when the mean peak probability of the heads' mean histogram over the foreground
control points is below this (the network finds no candidate that matches).

Measured with the shipped model on a 128 px T1 slice rolled by ``s`` px (method
``"network"``, guard off): the outer-ring share is 0 for s <= 5, 0.12-0.20 for s = 7-9,
and <= 0.04 for s >= 10, where the network's field collapses to about 0; the mean peak
probability is 0.50 at s = 0, 0.37 at 3, 0.21 at 6, 0.10-0.12 for s >= 8, and 0.30-0.34
on synthetic T1->T2/PD pairs with up to 6 px of motion (no warning)."""


def capture_range_check(
    probs: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, offsets, stride: int
) -> str | None:
    """A warning message when the network's histograms ``probs`` (2, 1, h, w, K, K) on a
    padded pair suggest motion beyond the capture range, else ``None``."""
    mean = probs.mean(0)[0].float()  # (h, w, K, K)
    h, w, k, _ = mean.shape
    fg = torch.nn.functional.max_pool2d(((fixed > 0.05) | (moving > 0.05)).float(), stride)
    fg = fg[0, 0, :h, :w] > 0
    if not bool(fg.any()):
        return None
    label = mean.flatten(-2).argmax(-1)[fg]
    a, b = label // k, label % k
    ring = ((a - k // 2).abs() == k // 2) | ((b - k // 2).abs() == k // 2)
    edge = float(ring.float().mean())
    peak = float(mean.flatten(-2).max(-1).values[fg].mean())
    if edge < CAPTURE_EDGE_FRACTION and peak >= CAPTURE_MIN_PEAK:
        return None
    q = float(offsets.abs().max())
    why = (
        f"{edge:.0%} of the foreground control points chose the largest displacement"
        if edge >= CAPTURE_EDGE_FRACTION
        else f"the network is unsure at most control points (mean peak probability {peak:.2f})"
    )
    return (
        f"{why}: the motion may be larger than the network's capture range of +/-{q:g} px "
        "(or the contrasts unlike its training); try refinement (method='bspline', the "
        "default, reaches further) or a pre-alignment"
    )


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
    offsets : ndarray, shape (K,), float32
        Displacement in pixels of each bin along one axis.
    stride : int
        Control-point spacing of the network; control point ``(i, j)`` is at pixel
        ``((i + 0.5) * stride - 0.5, (j + 0.5) * stride - 0.5)``
        (:func:`~napari_discreg.core.geometry.control_point_position`).
    method : str
        The method that made ``displacement`` (a key of :data:`METHODS`).
    refine_steps : int
        Optimisation steps after (or instead of) the network: Gauss-Newton steps over
        all levels for the B-spline methods, Adam steps per level for
        ``"network+adam"``, 0 for ``"network"``.
    identity_fallback : bool
        True when the field matched the pair worse than no motion (MIND-SSC distance,
        ``register(guard=True)``) and the zero field was used instead; for the network
        methods this is judged on the network's field (the refinement then starts from
        zero).
    capture_warning : str or None
        For the network methods: why the network's field may be unreliable because the
        motion looks larger than its capture range (also issued as a
        :class:`CaptureRangeWarning`); ``None`` when it looks fine or the network did not
        make the field.

    The network's view of the pair, the same whatever the method (computed on first use
    when the method did not need the network):

    probabilities : ndarray, shape (2, h, w, K, K), float32
        Displacement histogram of each head (F1, F2) at each control point; axis -2
        is the row displacement, axis -1 the column displacement.
    discrepancy : ndarray, shape (h, w), float32
        Projected Earth Mover's discrepancy between the heads per control point
        (marginals, in bins): high where the heads disagree, i.e. where the model is
        unsure on this kind of image.
    labels : ndarray, shape (h, w), int64
        Argmax label ``a * K + b`` of the mean histogram.
    """

    displacement: np.ndarray
    warped: np.ndarray
    offsets: np.ndarray
    stride: int
    method: str = DEFAULT_METHOD
    refine_steps: int = 0
    identity_fallback: bool = False
    capture_warning: str | None = None
    _network: NetworkOutputs | None = field(default=None, repr=False, compare=False)

    @property
    def probabilities(self) -> np.ndarray:
        return self._outputs()[0]

    @property
    def discrepancy(self) -> np.ndarray:
        return self._outputs()[1]

    @property
    def labels(self) -> np.ndarray:
        return self._outputs()[2]

    def network_outputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(probabilities, discrepancy, labels)``, running the network now if it has not
        run yet (e.g. in a worker thread, before a GUI reads them)."""
        return self._outputs()

    def _outputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._network is None:
            raise AttributeError("this result holds no network outputs")
        return self._network.get()

    def control_point(self, row: float, col: float) -> tuple[int, int]:
        """Index ``(i, j)`` of the control point whose block holds pixel ``(row, col)``."""
        h, w = control_grid(self.displacement.shape[-2:], self.stride)
        return control_point_index(row, col, self.stride, (h, w))

    def control_point_position(self, i: int, j: int) -> tuple[float, float]:
        """Pixel coordinates of control point ``(i, j)``."""
        return control_point_position(i, j, self.stride)


def method_summary(result: RegistrationResult) -> str:
    """A short phrase for messages: how ``result``'s field was made."""
    if result.method == "network":
        return "the network alone"
    kind = "Adam steps per level" if result.method == "network+adam" else "Gauss-Newton steps"
    start = "the network, then " if result.method.startswith("network+") else ""
    name = "Adam" if result.method == "network+adam" else "B-spline Gauss-Newton"
    return f"{start}{name} ({result.refine_steps} {kind})"


def control_grid(shape: tuple[int, int], stride: int) -> tuple[int, int]:
    """Control grid ``(h, w)`` of the network for an image of ``shape`` (padded up)."""
    return -(-int(shape[0]) // stride), -(-int(shape[1]) // stride)


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
    method: str | None = None,
    refine: bool | int | RefineConfig | BSplineConfig | None = None,
    guard: bool = True,
    progress: Callable[[int, int], None] | None = None,
    max_memory_gb: float | None = None,
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
    method : str, optional
        A key of :data:`METHODS`; default :data:`DEFAULT_METHOD` (``"bspline"``:
        B-spline Gauss-Newton over MIND-SSC descriptors,
        :func:`~napari_discreg.core.bspline.bspline_refine`; the network's histograms
        are computed on first use). ``"network"`` is the fastest: the network's field
        alone.
    refine : BSplineConfig, RefineConfig, int or bool, optional
        Settings of the method's refinement (a :class:`BSplineConfig` for the B-spline
        methods, a :class:`RefineConfig` or a number of Adam steps for
        ``"network+adam"``). Without ``method``, the form of earlier releases still
        works: ``refine=False`` or ``0`` is ``"network"``; ``True``, an int or a
        ``RefineConfig`` is ``"network+adam"``; a ``BSplineConfig`` is ``"bspline"``.
    guard : bool
        Keep a field only if it matches the pair better than no motion by the MIND-SSC
        distance; else use the zero field (``identity_fallback``). Default ``True``.
    progress : callable, optional
        ``progress(done, total)``: called at the start, after the network's pass and
        after every optimiser step (Gauss-Newton or Adam), and at the end. An exception
        it raises (a stop request) ends the registration and propagates.
    max_memory_gb : float, optional
        Refuse (``ValueError``) when the estimated peak memory
        (:func:`~napari_discreg.core.memory.register_estimate`) exceeds this many GB;
        default: the environment variable ``NAPARI_DISCREG_MAX_MEMORY_GB``, else 8 GB. The
        memory available on the machine bounds it too.

    The caller's model is not modified: its train/eval mode is left as it is (the
    network computes the same in both), so one model may serve several threads.

    Warns
    -----
    CaptureRangeWarning
        For the network methods, when the network's field suggests motion beyond its
        capture range (``RegistrationResult.capture_warning``).

    Returns
    -------
    RegistrationResult

    Raises
    ------
    ValueError
        For images that are not 2D, differ in shape, hold NaN/inf, are constant or
        smaller than the label range needs, that would need more memory than allowed,
        and for an unknown method or settings that do not fit it.
    """
    method, settings = resolve_method(method, refine)
    if model is None:
        model = default_model(device)
        dev = next(model.parameters()).device
    else:
        dev = resolve_device(device) if device is not None else next(model.parameters()).device
        model = model.to(dev)
    if model.training and not mode_independent(model):
        raise ValueError(
            "this model computes differently in train mode; call model.eval() before register"
        )
    cfg = model.config
    f, m = check_pair(
        fixed, moving, min_size=min_image_size(cfg.num_labels, cfg.capture_range, cfg.stride)
    )
    h, w = f.shape
    check_memory(
        register_estimate(cfg, method, (h, w)),
        limit_gb=max_memory_gb,
        hint="downsample or crop the images (or raise the limit with max_memory_gb or "
        f"{ENV_LIMIT})",
    )
    ft = network_input(f, cfg.stride, dev)
    mt = network_input(m, cfg.stride, dev)
    outputs = NetworkOutputs(model, ft, mt)
    fallback = False
    capture = None
    steps = 0
    # judged and optimised on the image itself, not its padding
    fi, mi = ft[..., :h, :w], mt[..., :h, :w]
    # optimiser steps the progress counts: Gauss-Newton steps, or Adam steps of every level
    if isinstance(settings, BSplineConfig):
        planned = _bspline_steps(settings, (h, w))
    elif isinstance(settings, RefineConfig):
        planned = refine_step_count(settings, (h, w))
    else:
        planned = 0
    total = (0 if method == "bspline" else 1) + planned
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done, total), total)

    callback = tick if progress is not None else None
    if progress is not None:
        progress(0, total)
    if method == "bspline":
        assert isinstance(settings, BSplineConfig)
        descriptors: list = []
        dense = bspline_refine(fi, mi, None, settings, descriptors=descriptors, callback=callback)
        steps = planned
        if guard:
            dense, fallback = _guard(fi, mi, dense, descriptors, settings)
    else:
        dense, _, probs = _run_network(model, ft, mt)
        capture = capture_range_check(probs, ft, mt, model.offsets, cfg.stride)
        if capture is not None:
            warnings.warn(capture, CaptureRangeWarning, stacklevel=2)
        outputs.set(probs)
        dense = dense[..., :h, :w]
        tick()
        if guard:
            dense, fallback = _guard(fi, mi, dense, [], None)
        if method == "network+bspline":
            assert isinstance(settings, BSplineConfig)
            dense = bspline_refine(fi, mi, dense, settings, callback=callback)
            steps = planned
        elif method == "network+adam":
            assert isinstance(settings, RefineConfig)
            dense = refine_field(fi, mi, dense, settings, callback=callback)
            steps = settings.steps
    with torch.no_grad():
        moving_raw = torch.from_numpy(m)[None, None].to(dev)
        warped = warp(moving_raw, dense)[0, 0]
    if progress is not None:
        progress(total, total)
    return RegistrationResult(
        displacement=dense[0].cpu().numpy().astype(np.float32),
        warped=warped.cpu().numpy().astype(np.float32),
        offsets=model.offsets.cpu().numpy().astype(np.float32),
        stride=cfg.stride,
        method=method,
        refine_steps=steps,
        identity_fallback=fallback,
        capture_warning=capture,
        _network=outputs,
    )


def resolve_method(
    method: str | None, refine: bool | int | RefineConfig | BSplineConfig | None
) -> tuple[str, BSplineConfig | RefineConfig | None]:
    """The method name and its settings from :func:`register`'s ``method`` and ``refine``."""
    if isinstance(refine, int) and not isinstance(refine, bool) and refine < 0:
        raise ValueError(f"refine must be >= 0 steps, got {refine}")
    if refine is not None and not isinstance(refine, (bool, int, RefineConfig, BSplineConfig)):
        raise TypeError(
            "refine must be a BSplineConfig, a RefineConfig, an int or a bool, got "
            f"{type(refine).__name__}"
        )
    if method is None:  # the forms of earlier releases
        if refine is None or isinstance(refine, BSplineConfig):
            method = DEFAULT_METHOD
        elif refine is False or refine == 0:
            method = "network"
        else:
            method = "network+adam"
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("bspline", "network+bspline"):
        if refine is None or refine is True:
            return method, BSplineConfig()
        if isinstance(refine, BSplineConfig):
            return method, refine
        raise ValueError(f"method {method!r} takes a BSplineConfig as refine, got {refine!r}")
    if method == "network+adam":
        if refine is None or refine is True:
            return method, RefineConfig()
        if isinstance(refine, RefineConfig):
            return method, refine
        if isinstance(refine, int) and refine > 0:
            return method, RefineConfig(steps=refine)
        raise ValueError(f"method 'network+adam' takes a RefineConfig or steps > 0, got {refine!r}")
    if refine not in (None, False, 0):
        raise ValueError(f"method 'network' takes no refinement settings, got {refine!r}")
    return method, None


def _bspline_steps(config: BSplineConfig, shape: tuple[int, int]) -> int:
    return int(sum(n for _, n in level_schedule(shape, config)))


def _guard(fixed, moving, dense, descriptors, config):
    """``(field, fell_back)``: the zero field where it matches better than ``dense``."""
    pre = None
    if descriptors and config is not None and config.radius == 1 and 2 in config.dilations:
        k = list(config.dilations).index(2)  # the guard's MIND-SSC(radius 1, dilation 2) block
        pre = tuple(d[:, 6 * k : 6 * k + 6] for d in descriptors)
    chosen, use_zero = no_worse_than_identity(fixed, moving, dense, descriptors=pre)
    return chosen, bool(use_zero[0])
