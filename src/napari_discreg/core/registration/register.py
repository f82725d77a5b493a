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
import torch.nn.functional as F

from ..config import FOREGROUND_THRESHOLD, BSplineConfig, RefineConfig
from ..files.checkpoint import load_model
from ..learning.discrepancy import projected_emd
from ..learning.model import DiscreteRegistrationNet, clone_model, mode_independent, resolve_device
from ..memory import ENV_LIMIT, check_memory, register_estimate
from .bspline import bspline_refine
from .geometry import control_grid_shape, control_point_index, control_point_position
from .label_grid import argmax_label
from .methods import DEFAULT_METHOD, Method, method_named, resolve_method
from .mind import mind_ssc
from .prealign import (
    DEFAULT_PREALIGN,
    PREALIGN_MODES,
    PrealignSettings,
    prealign_steps,
    tissue_image,
    to_gray,
    unmoved_matrix,
)
from .prealign import prealign as find_prealignment
from .predict import predict_field
from .preprocess import check_image, min_image_size, network_input, pad_to_multiple
from .refine import no_worse_than_identity, refine_field
from .warp import affine_positions, jacobian_determinant, pixel_grid, sample, warp

_DEFAULT_MODELS: dict[str, DiscreteRegistrationNet] = {}


class NetworkOutputs:
    """The network's histograms for one pair, computed once, on first use.

    The ``"bspline"`` and ``"none"`` methods do not need the network for the field; its histograms,
    head discrepancy and labels (the inspector's view) are computed when first read, on
    the thread that reads them, with the weights the model had at registration (a copy).
    """

    def __init__(self, model, fixed, moving) -> None:
        self._inputs = (model, fixed, moving)
        self._values: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

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
    computes the same in both modes (:func:`~napari_discreg.core.learning.model.mode_independent`),
    which :func:`register` checks.
    """
    with torch.inference_mode():
        return predict_field(model, ft, mt)


NETWORK_LEVELS: tuple[int, ...] = (4, 2, 1)
"""Downsampling factors of the network's coarse-to-fine passes: at a quarter of the
resolution its +/-7 bins reach +/-28 px. A level runs where the image keeps
:data:`NETWORK_MIN_SIDE` px a side; each level's field is kept only where it matches
better than the field before it (MIND-SSC)."""
NETWORK_MIN_SIDE = 64
COARSE_MIN_GAIN = 0.05
"""A coarse level's field is kept only when it lowers the level's MIND-SSC distance by
this share: it is there to catch large motion (the artificial elastic pair: -64 % at a
quarter of the resolution), and a coarse field that gains little costs accuracy at full
resolution (the real kidney pair: -0.5 %, and 1.46 -> 2.32 px median TRE when kept)."""


def _mind_gain(fixed: torch.Tensor, moving: torch.Tensor, field: torch.Tensor) -> float:
    """Relative drop of the MIND-SSC distance when ``moving`` is warped by ``field``."""
    desc = mind_ssc(fixed)
    before = float(((desc - mind_ssc(moving)) ** 2).mean())
    after = float(((desc - mind_ssc(warp(moving, field))) ** 2).mean())
    return (before - after) / before if before > 0 else 0.0


def _downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return image
    h, w = image.shape[-2:]
    size = (max(1, round(h / factor)), max(1, round(w / factor)))
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)


def network_coarse_to_fine(
    model, fixed: torch.Tensor, moving: torch.Tensor, levels=NETWORK_LEVELS, callback=None
):
    """The network's field (1, 2, H, W) for normalised images (1, 1, H, W), coarse to
    fine, and the last level's padded inputs and histograms ``(ft, mt, probs)``: those of
    the full-resolution pass over the pair warped by the coarser levels' field."""
    stride = model.config.stride
    h, w = fixed.shape[-2:]
    grid = pixel_grid(h, w, device=fixed.device)[None]
    field = torch.zeros(1, 2, h, w, device=fixed.device)
    factors = [f for f in levels if f == 1 or min(h, w) / f >= NETWORK_MIN_SIDE]
    if 1 not in factors:
        factors.append(1)
    for f in factors:
        warped = moving if f == factors[0] else sample(moving, grid + field)
        fl, ml = _downsample(fixed, f), _downsample(warped, f)
        hl, wl = fl.shape[-2:]
        # already normalised: padded as network_input pads, not normalised again
        ft, mt = pad_to_multiple(fl, stride), pad_to_multiple(ml, stride)
        dense, _, probs = _run_network(model, ft, mt)
        dense = dense[..., :hl, :wl]
        if f > 1:
            if _mind_gain(ft[..., :hl, :wl], mt[..., :hl, :wl], dense) < COARSE_MIN_GAIN:
                continue
            scale = torch.tensor([h / hl, w / wl], device=fixed.device).view(1, 2, 1, 1)
            dense = F.interpolate(dense, size=(h, w), mode="bilinear", align_corners=False) * scale
        field = dense + sample(field, grid + dense)
        if callback is not None:
            callback()
    return field, ft, mt, probs


class CaptureRangeWarning(UserWarning):
    """The network's field looks unreliable because the motion may exceed its capture range."""


CAPTURE_EDGE_FRACTION = 0.05
"""Warn when at least this share of the foreground control points have their most
probable label on the outermost ring of the K x K grid (the capture range).

Measured with the shipped model on a 128 px T1 slice rolled by ``s`` px (method
``"network"``, guard off, one level): the outer-ring share is 0 for s <= 5 and 0.12-0.20
for s = 7-9. A low peak probability is no sign of over-range motion: it is as low on an
unfamiliar contrast (the real stain pairs after pre-alignment, where the network's field
was the most accurate of all methods), so it does not warn."""


def capture_range_check(
    probs: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, offsets, stride: int
) -> str | None:
    """A warning message when the network's histograms ``probs`` (2, 1, h, w, K, K) on a
    padded pair suggest motion beyond the capture range, else ``None``."""
    mean = probs.mean(0)[0].float()  # (h, w, K, K)
    h, w, k, _ = mean.shape
    fg = torch.nn.functional.max_pool2d(
        ((fixed > FOREGROUND_THRESHOLD) | (moving > FOREGROUND_THRESHOLD)).float(), stride
    )
    fg = fg[0, 0, :h, :w] > 0
    if not bool(fg.any()):
        return None
    label = mean.flatten(-2).argmax(-1)[fg]
    a, b = label // k, label % k
    ring = ((a - k // 2).abs() == k // 2) | ((b - k // 2).abs() == k // 2)
    edge = float(ring.float().mean())
    if edge < CAPTURE_EDGE_FRACTION:
        return None
    q = float(offsets.abs().max())
    return (
        f"{edge:.0%} of the foreground control points chose the largest displacement the "
        f"network's finest pass reaches (+/-{q:g} px) after the pre-alignment and the coarse "
        "passes: the motion may be larger there; check the review view, or try "
        "method='bspline'"
    )


@dataclass
class RegistrationResult:
    """Output of :func:`register`.

    Attributes
    ----------
    displacement : ndarray, shape (2, H, W), float32
        On the fixed image's grid (H, W), in pixels, (row, col) order, same meaning as
        ``skimage.registration.optical_flow_tvl1``:
        ``warped(r, c) = moving(r + displacement[0, r, c], c + displacement[1, r, c])``,
        where ``(r + u0, c + u1)`` indexes the moving image's pixels (its shape may differ).
    warped : ndarray, shape (H, W), float32
        The moving image (original intensities; luminance of a colour image) warped
        onto the fixed image's grid.
    offsets : ndarray, shape (K,), float32
        Displacement in pixels of each bin along one axis.
    stride : int
        Control-point spacing of the network; control point ``(i, j)`` is at pixel
        ``((i + 0.5) * stride - 0.5, (j + 0.5) * stride - 0.5)``
        (:func:`~napari_discreg.core.registration.geometry.control_point_position`).
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
    affine : ndarray, shape (3, 3), float64
        The pre-alignment alone: fixed pixel ``(r, c, 1)`` -> moving pixel. The identity
        (or the ratio of the spacings) when ``prealign="none"`` or when no transform
        matched better than the images as they lie.
    prealign : str
        The pre-alignment mode that ran (a key of
        :data:`~napari_discreg.core.registration.prealign.PREALIGN_MODES`).
    quality : dict
        How well the result matches, without ground truth
        (:func:`quality_report`): the MIND-SSC distance before registration, after the
        pre-alignment and after registration, their ratio, the share of folding pixels,
        the largest displacement of the deformable stage.
    warnings : list of str
        Why the result is probably wrong (empty when nothing looks wrong); the capture
        warning is one of them.

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
    affine: np.ndarray = field(default_factory=lambda: np.eye(3))
    prealign: str = "none"
    quality: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
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
        h, w = control_grid_shape(self.displacement.shape[-2:], self.stride)
        return control_point_index(row, col, self.stride, (h, w))

    def control_point_position(self, i: int, j: int) -> tuple[float, float]:
        """Pixel coordinates of control point ``(i, j)``."""
        return control_point_position(i, j, self.stride)


def method_summary(result: RegistrationResult) -> str:
    """A short phrase for messages: how ``result``'s field was made."""
    pre = "" if result.prealign == "none" else f"{result.prealign} pre-alignment, then "
    method = method_named(result.method)
    if not method.network and method.optimiser is None:
        return f"the {result.prealign} pre-alignment alone" if pre else "no registration"
    return pre + method.summary(result.refine_steps)


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
    prealign: str = DEFAULT_PREALIGN,
    fixed_spacing=None,
    moving_spacing=None,
    guard: bool = True,
    progress: Callable[[int, int], None] | None = None,
    max_memory_gb: float | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``: pre-alignment, then the deformable method.

    Parameters
    ----------
    fixed, moving : array_like, shape (H, W) or (H, W, 3|4)
        2D images of any sizes (they may differ), grayscale of any real dtype (8- and
        16-bit included) or RGB(A), registered by their luminance. Intensities are
        normalised internally (robust percentiles); a bright background (bright-field
        histology) is detected and inverted for the network. The result lives on the
        fixed image's grid.
    model : DiscreteRegistrationNet, optional
        Default: the pretrained model shipped with the package.
    device : str or torch.device, optional
        ``None`` picks CUDA when available, else CPU. Defaults to the model's device
        when a model is given.
    method : str, optional
        The deformable stage after the pre-alignment, a key of :data:`METHODS`; default
        :data:`DEFAULT_METHOD` (``"network"``: the network's field, coarse to fine,
        :func:`network_coarse_to_fine`). ``"bspline"`` is B-spline Gauss-Newton over
        MIND-SSC descriptors (:func:`~napari_discreg.core.registration.bspline.bspline_refine`; the
        network's histograms are then computed on first use); ``"none"`` keeps the
        pre-alignment alone.
    refine : BSplineConfig, RefineConfig, int or bool, optional
        Settings of the method's refinement (a :class:`BSplineConfig` for the B-spline
        methods, a :class:`RefineConfig` or a number of Adam steps for
        ``"network+adam"``). Without ``method``, the form of earlier releases still
        works: ``refine=False`` or ``0`` is ``"network"``; ``True``, an int or a
        ``RefineConfig`` is ``"network+adam"``; a ``BSplineConfig`` is ``"bspline"``.
    prealign : str
        ``"affine"`` (the default), ``"similarity"``, ``"rigid"`` or ``"none"``
        (:data:`~napari_discreg.core.registration.prealign.PREALIGN_MODES`): the transform found
        first, across modalities, with a search over the full circle of rotations
        (:func:`~napari_discreg.core.registration.prealign.prealign`). It is kept only when it
        matches better than the images as they lie.
    fixed_spacing, moving_spacing : (float, float), optional
        Physical pixel sizes (row, col), e.g. a napari layer's ``scale``; default 1.
        Without pre-alignment, pixels at the same physical position correspond.
    guard : bool
        Keep the deformable field only if it matches the pair better than the
        pre-alignment alone by the MIND-SSC distance; else use the pre-alignment
        (``identity_fallback``). Default ``True``.
    progress : callable, optional
        ``progress(done, total)``: called at the start, after every pre-alignment and
        optimiser step (Gauss-Newton or Adam) and after the network's pass, and at the
        end. An exception it raises (a stop request) ends the registration and
        propagates.
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
        For images that are not 2D (or RGB), hold NaN/inf, are constant or smaller
        than the label range needs, that would need more memory than allowed, and for
        an unknown method, pre-alignment or settings that do not fit it.
    """
    chosen, settings = resolve_method(method, refine)
    if prealign not in PREALIGN_MODES:
        raise ValueError(
            f"unknown pre-alignment {prealign!r}; choose one of {', '.join(PREALIGN_MODES)}"
        )
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
    min_size = min_image_size(cfg.num_labels, cfg.capture_range, cfg.stride)
    f = check_image(to_gray(fixed), "fixed", min_size=min_size)
    m = check_image(to_gray(moving), "moving", min_size=min_size)
    h, w = f.shape
    check_memory(
        register_estimate(cfg, chosen, (h, w), settings),
        limit_gb=max_memory_gb,
        device=dev,
        hint="downsample or crop the images (or raise the limit with max_memory_gb or "
        f"{ENV_LIMIT})",
    )
    # optimiser steps the progress counts: pre-alignment, Gauss-Newton or Adam steps
    planned = chosen.planned_steps(settings, (h, w))
    pre_steps = 0 if prealign == "none" else prealign_steps(PrealignSettings())
    total = pre_steps + int(chosen.network) + planned
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done, total), total)

    callback = tick if progress is not None else None
    if progress is not None:
        progress(0, total)

    # the pre-alignment: a map of the fixed grid into the moving image's pixels
    f_tissue, m_tissue = tissue_image(f), tissue_image(m)
    matrix = find_prealignment(
        f_tissue,
        m_tissue,
        prealign,
        fixed_spacing=fixed_spacing,
        moving_spacing=moving_spacing,
        callback=callback,
    )
    done = pre_steps
    start, ft, mt = _prealigned_pair(f_tissue, m_tissue, matrix, cfg.stride, dev)
    # without the network in the field its histograms are computed when first read: from
    # a copy of today's weights, not from whatever an adaptation has made of them by then
    outputs = NetworkOutputs(model if chosen.network else clone_model(model), ft, mt)
    # judged and optimised on the image itself, not its padding
    stage = _deformable_stage(
        model,
        chosen,
        settings,
        ft[..., :h, :w],
        mt[..., :h, :w],
        guard=guard,
        network_done=tick,
        callback=callback,
        planned=planned,
    )
    dense, capture, fallback, steps = stage.field, stage.capture, stage.fallback, stage.steps
    if stage.probabilities is not None:
        outputs.set(stage.probabilities)
    if capture is not None:
        warnings.warn(capture, CaptureRangeWarning, stacklevel=2)
    with torch.no_grad():
        positions = _compose(start, matrix, dense)
        moving_raw = torch.from_numpy(m)[None, None].to(dev)
        warped = sample(moving_raw, positions)[0, 0]
        displacement = positions - pixel_grid(h, w, device=dev)
        quality = quality_report(
            f_tissue,
            m_tissue,
            matrix,
            positions,
            dense,
            fixed_spacing=fixed_spacing,
            moving_spacing=moving_spacing,
        )
    notes = result_warnings(quality, capture)
    if progress is not None:
        progress(total, total)
    return RegistrationResult(
        displacement=displacement[0].cpu().numpy().astype(np.float32),
        warped=warped.cpu().numpy().astype(np.float32),
        offsets=model.offsets.cpu().numpy().astype(np.float32),
        stride=cfg.stride,
        method=chosen.name,
        refine_steps=steps,
        identity_fallback=fallback,
        capture_warning=capture,
        affine=np.asarray(matrix, dtype=np.float64),
        prealign=prealign,
        quality=quality,
        warnings=notes,
        _network=outputs,
    )


def _prealigned_pair(f_tissue, m_tissue, matrix, stride: int, dev):
    """The pre-alignment's positions (1, 2, H, W) in moving pixels, and the network's
    padded, normalised inputs: the fixed image and the moving image resampled there."""
    h, w = f_tissue.shape
    start = affine_positions(matrix, h, w, device=dev)
    moving_t = torch.from_numpy(np.ascontiguousarray(m_tissue, dtype=np.float32))[None, None]
    with torch.no_grad():
        aligned = sample(moving_t.to(dev), start)[0, 0].cpu().numpy()
    return start, network_input(f_tissue, stride, dev), network_input(aligned, stride, dev)


def _compose(start: torch.Tensor, matrix, dense: torch.Tensor) -> torch.Tensor:
    """x -> A (x + d(x)): the moving positions of the pre-alignment followed by the
    deformable field ``dense`` (pre-aligned moving pixels; the affine's linear part
    carries it)."""
    linear = torch.as_tensor(np.asarray(matrix)[:2, :2], dtype=dense.dtype, device=dense.device)
    return start + torch.einsum("ij,bjhw->bihw", linear, dense)


@torch.no_grad()
def network_stage_distance(model: DiscreteRegistrationNet, fixed, moving, matrix) -> float:
    """How well ``model``'s network stage registers a pair after a given pre-alignment:
    the MIND-SSC distance (over :data:`QUALITY_SCALES`, lower is better) between the
    fixed image and the moving image mapped by ``matrix`` (fixed pixel -> moving pixel,
    :attr:`RegistrationResult.affine`) and then by the network's field, coarse to fine
    and guarded, as :func:`register` makes it for ``method="network"``: that result's
    ``quality["mind_after"]``. Label-free; it judges adapted weights on the very pair
    they were adapted to, as the pipeline will use them."""
    dev = next(model.parameters()).device
    cfg = model.config
    min_size = min_image_size(cfg.num_labels, cfg.capture_range, cfg.stride)
    f_tissue = tissue_image(check_image(to_gray(fixed), "fixed", min_size=min_size))
    m_tissue = tissue_image(check_image(to_gray(moving), "moving", min_size=min_size))
    h, w = f_tissue.shape
    start, ft, mt = _prealigned_pair(f_tissue, m_tissue, matrix, cfg.stride, dev)
    fi, mi = ft[..., :h, :w], mt[..., :h, :w]
    dense, _, _, _ = network_coarse_to_fine(model, fi, mi)
    dense, _ = _guard(fi, mi, dense, [], None)
    desc = _mind_pyramid(network_input(f_tissue, 1, dev))
    return mind_distance(desc, m_tissue, _compose(start, matrix, dense))


@dataclass
class _Stage:
    """What the deformable stage gives :func:`register`."""

    field: torch.Tensor  # (1, 2, H, W) in the pre-aligned moving image's pixels
    probabilities: torch.Tensor | None  # the network's last pass, when it ran
    capture: str | None  # the capture-range warning, if any
    fallback: bool  # the guard replaced the field by the pre-alignment alone
    steps: int  # optimiser steps of the refinement


def _deformable_stage(
    model: DiscreteRegistrationNet,
    chosen: Method,
    settings,
    fi: torch.Tensor,
    mi: torch.Tensor,
    *,
    guard: bool,
    network_done: Callable[[], None],
    callback: Callable[[], None] | None,
    planned: int,
) -> _Stage:
    """The method's deformable field on the pre-aligned pair (normalised (1, 1, H, W)
    images): the network coarse to fine, then its refinement (B-spline or Adam), each
    kept only where the guard finds it better than the pre-alignment alone."""
    h, w = fi.shape[-2:]
    dense = fi.new_zeros(1, 2, h, w)
    probs, capture, fallback, steps = None, None, False, 0
    if chosen.network:
        dense, last_f, last_m, probs = network_coarse_to_fine(model, fi, mi)
        capture = capture_range_check(probs, last_f, last_m, model.offsets, model.config.stride)
        network_done()
        if guard:
            dense, fallback = _guard(fi, mi, dense, [], None)
    if isinstance(settings, BSplineConfig):
        descriptors: list = []
        start_field = dense if chosen.network else None
        dense = bspline_refine(
            fi, mi, start_field, settings, descriptors=descriptors, callback=callback
        )
        steps = planned
        if guard and not chosen.network:
            dense, fallback = _guard(fi, mi, dense, descriptors, settings)
    elif isinstance(settings, RefineConfig):
        dense = refine_field(fi, mi, dense, settings, callback=callback)
        steps = settings.steps
    return _Stage(dense, probs, capture, fallback, steps)


QUALITY_SCALES = (1, 2, 4)
"""Downsampling factors over which :func:`mind_distance` averages: at full resolution two
stains' textures differ more than a few pixels of misalignment do (the lung pair, 33 px
apart before registration: 0.95 x the distance after it at full resolution alone)."""


def _mind_pyramid(image: torch.Tensor) -> list[torch.Tensor]:
    """MIND-SSC descriptors of a normalised (1, 1, H, W) image at :data:`QUALITY_SCALES`
    (levels under 16 px a side are skipped)."""
    return [
        mind_ssc(_downsample(image, f))
        for f in QUALITY_SCALES
        if f == 1 or min(image.shape[-2:]) / f >= 16
    ]


def mind_distance(fixed: list[torch.Tensor], moving: np.ndarray, positions: torch.Tensor) -> float:
    """MIND-SSC distance between the fixed image (its :func:`_mind_pyramid`) and
    ``moving`` sampled at ``positions`` (1, 2, H, W): the mean over the scales."""
    mt = torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float32))[None, None]
    warped = sample(mt.to(positions.device), positions)
    wt = network_input(warped[0, 0].cpu().numpy(), 1, positions.device)
    pairs = zip(fixed, _mind_pyramid(wt), strict=True)
    return float(np.mean([float(((a - b) ** 2).mean()) for a, b in pairs]))


QUALITY_NO_GAIN = 0.97
"""Warn when the registered pair's MIND-SSC distance is above this share of the
distance before registration: it then matches hardly better than doing nothing. Measured
with the default pipeline: the real stain pairs 0.69 and 0.88, BIRL's artificial pairs
0.09-0.17, a 96 px template pair with 4.5 px of motion 0.86; unmoved pairs 1.0 (they are
told that they were aligned already or that the motion was missed)."""
QUALITY_MAX_FOLDING = 0.01
"""Warn when more than this share of the deformable field's pixels fold."""


def quality_report(
    fixed, moving, matrix, positions, dense, *, fixed_spacing=None, moving_spacing=None
) -> dict:
    """Label-free quality figures of a registration (see :class:`RegistrationResult`)."""
    h, w = fixed.shape
    dev = positions.device
    unmoved = affine_positions(unmoved_matrix(fixed_spacing, moving_spacing), h, w, device=dev)
    start = affine_positions(matrix, h, w, device=dev)
    desc = _mind_pyramid(network_input(fixed, 1, dev))  # the fixed side once, for all three
    before = mind_distance(desc, moving, unmoved)
    aligned = mind_distance(desc, moving, start)
    after = mind_distance(desc, moving, positions)
    jac = jacobian_determinant(dense[0])
    return {
        "mind_before": before,
        "mind_prealigned": aligned,
        "mind_after": after,
        "mind_ratio": after / before if before > 0 else 1.0,
        "folding": float((jac <= 0).mean()),
        "max_deformable_px": float(dense[0].norm(dim=0).max()),
        "affine_determinant": float(np.linalg.det(np.asarray(matrix)[:2, :2])),
    }


def result_warnings(quality: dict, capture: str | None) -> list[str]:
    """Why a registration is probably wrong, from its :func:`quality_report`."""
    notes = []
    if quality["mind_ratio"] > QUALITY_NO_GAIN:
        notes.append(
            "the registered images match hardly better than before registration (MIND-SSC "
            f"distance {quality['mind_after']:.4f} vs {quality['mind_before']:.4f}): either "
            "they were aligned already or the registration missed the motion; check the review view"
        )
    if quality["folding"] > QUALITY_MAX_FOLDING:
        notes.append(
            f"{quality['folding']:.1%} of the field folds (Jacobian <= 0): the deformation "
            "is implausible there"
        )
    det = quality["affine_determinant"]
    if not 0.25 <= det <= 4:
        notes.append(
            f"the pre-alignment scales the area by {det:.2f}: are the images' spacings right?"
        )
    if capture is not None:
        notes.append(capture)
    return notes


def _guard(fixed, moving, dense, descriptors, config):
    """``(field, fell_back)``: the zero field where it matches better than ``dense``."""
    pre = None
    if descriptors and config is not None and config.radius == 1 and 2 in config.dilations:
        k = list(config.dilations).index(2)  # the guard's MIND-SSC(radius 1, dilation 2) block
        pre = tuple(d[:, 6 * k : 6 * k + 6] for d in descriptors)
    chosen, use_zero = no_worse_than_identity(fixed, moving, dense, descriptors=pre)
    return chosen, bool(use_zero[0])
