"""Every default of napari-discreg lives here, once.

The dataclasses are plain, JSON-serialisable records: a checkpoint stores them
next to its weights so that a model can always be rebuilt exactly.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

MAX_JSON_DEPTH = 16
"""Deepest nesting of lists and objects accepted in JSON read from a checkpoint or a state."""
MAX_IMAGE_SIDE = 2048
"""Largest side in pixels of the images a config may ask for (``DataConfig.size``)."""
MIN_IMAGE_SIDE = 16
"""Smallest side in pixels that :func:`register` accepts for the shipped models (their
label range, :func:`~napari_discreg.core.registration.preprocess.min_image_size`); training and
adaptation sizes below it are refused too."""


ENV_PREFIX = "NAPARI_DISCREG_"
"""Environment variables that set napari-discreg's limits start with this."""


MAX_LIMIT = 1e15
"""Largest value any limit may take (GB, voxels, seconds): beyond it a number is a typo,
and converting it to bytes or an integer would overflow."""


def limit_setting(
    value: float | None, env: str, default: float, *, unit: str, integer: bool = False
) -> tuple[float, str]:
    """A positive limit and where it comes from: ``value`` when given, else the
    environment variable ``env``, else ``default`` (``ValueError`` for one that is not a
    positive finite number, or not whole when ``integer``)."""
    source = "the limit given"
    if value is None:
        raw = os.environ.get(env, "").strip()
        if raw:
            try:
                value = int(raw) if integer else float(raw)
            except ValueError:
                kind = "whole number" if integer else "number"
                raise ValueError(f"{env}={raw!r} is not a {kind} of {unit}") from None
            source = f"{env}={raw}"
        else:
            value, source = default, f"the default (set {env} to change it)"
    try:
        number = float(value)
    except OverflowError:  # a 400-digit integer
        raise ValueError(
            f"the limit ({source}) must be at most {MAX_LIMIT:g} {unit}, got a "
            f"{len(str(value))}-digit number"
        ) from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"the limit must be a finite number of {unit} > 0, got {value}")
    if number > MAX_LIMIT:
        raise ValueError(
            f"the limit ({source}) must be at most {MAX_LIMIT:g} {unit}, got {number:g}"
        )
    return value, source


def parse_json(text: str, where: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for text read from a file: malformed or too deeply nested JSON
    (which makes Python's parser recurse) raises ``ValueError`` naming ``where``."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected JSON text, got {type(text).__name__}")
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:  # bracket depth outside strings, before the recursive parser runs
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > max_depth:
                raise ValueError(
                    f"{where}: JSON nested deeper than {max_depth} levels; the file is corrupt "
                    "or was not written by napari-discreg"
                )
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from exc


def _field_error(cls: type, name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{cls.__name__}.{name} must be {expected}, got {value!r}")


def _coerce(cls: type, name: str, kind: str, value: Any) -> Any:
    """``value`` checked against the declared type ``kind`` (a string: the modules use
    postponed annotations): whole numbers for ``int`` (an integral float becomes an int),
    finite real numbers for ``float``, and so on; a clear ``ValueError`` otherwise."""
    kind = kind.replace(" ", "")
    if kind.endswith("|None"):
        return None if value is None else _coerce(cls, name, kind[: -len("|None")], value)
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise _field_error(cls, name, "true or false", value)
    if kind == "int":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise _field_error(cls, name, "a whole number", value)
        if isinstance(value, numbers.Integral):
            return int(value)
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            return int(number)
        raise _field_error(cls, name, "a whole number", value)
    if kind == "float":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise _field_error(cls, name, "a number", value)
        if not math.isfinite(value):
            raise _field_error(cls, name, "a finite number", value)
        return float(value)
    if kind == "str":
        if isinstance(value, str):
            return value
        raise _field_error(cls, name, "a string", value)
    if kind.startswith("tuple["):
        if not isinstance(value, (tuple, list)):
            raise _field_error(cls, name, f"a list ({kind})", value)
        inner = kind[len("tuple[") : -1].split(",")
        if len(inner) == 2 and inner[1] == "...":
            return tuple(_coerce(cls, name, inner[0], v) for v in value)
        if len(value) != len(inner):
            raise _field_error(cls, name, f"{len(inner)} values", value)
        return tuple(_coerce(cls, name, t, v) for t, v in zip(inner, value, strict=True))
    return value  # pragma: no cover - every declared type is handled above


class Config:
    """What every settings record shares: ``to_dict`` (JSON-able) and ``from_dict``
    (rejects unknown keys with a clear message; JSON lists become the tuples the fields
    declare). Subclasses are frozen dataclasses; ``_upgrade`` fills keys that older
    records lack.

    Every field is checked against its declared type when a record is made, however it
    is made (``from_dict`` on a checkpoint's or a state file's JSON, or in code): whole
    numbers for ``int`` fields, finite numbers for ``float`` fields, booleans, strings
    and tuples of those; the subclasses' ``_check`` then bounds the ranges. Anything else
    raises ``ValueError`` with the field's name.
    """

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = _coerce(type(self), f.name, str(f.type), getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Range checks of the subclass (the types are already checked)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} must be a mapping, got {type(data).__name__}")
        data = cls._upgrade(dict(data))
        declared = {f.name: str(f.type) for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(map(str, data)) - set(declared))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)


SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "default": ("discreg_t1_t2_pd.safetensors", "source model, contrast-augmented T1/T2/PD pairs"),
    "mono": ("discreg_mono_t1_t2_pd.safetensors", "paper protocol: mono-modal source only"),
}
"""Name -> (file in ``napari_discreg/weights``, one-line description) of every model
shipped with the package; each has its training record beside it (same stem, .json).
``load_model(name)`` loads one; ``"default"`` is what ``load_model()`` and
``register()`` use."""


# Bounds of a model's architecture: a checkpoint's config is checked against them before
# anything is built (a 3 kB file asking for K = 1001 would otherwise allocate gigabytes).
# The shipped models use K = 15, q = 7, stride 4, 24 features, 64 head channels, T = 10.
MAX_NUM_LABELS = 63
MAX_CAPTURE_RANGE = 128.0
MAX_STRIDE = 32
MAX_CHANNELS = 1024
MAX_TEMPERATURE = 1000.0
# Bounds of the other settings (steps, pairs, levels): far above any sensible value, low
# enough that a tampered state file cannot ask for an endless or enormous run.
MAX_COUNT = 1_000_000
MAX_BATCH = 4096
MAX_LEVELS = 8


@dataclass(frozen=True)
class ModelConfig(Config):
    """Architecture of the two-head discrete registration network.

    Attributes
    ----------
    num_labels : int
        K, the number of candidate displacements per axis (K x K labels). Odd, so
        that zero displacement is a label.
    capture_range : float
        q, the largest candidate displacement in pixels: offsets are
        ``q * linspace(-1, 1, K)``.
    stride : int
        Control-point spacing in pixels. Images are padded to a multiple of it.
    features : int
        Channels of the shared feature extractor G.
    head_channels : int
        Channels of the hidden layers of the classifier heads F1 and F2.
    head_bottleneck : int
        Channels of a 1 x 1 convolution that first compresses the K^2 costs in each
        head; 0: no bottleneck (the first head layer is a 3 x 3 convolution over all
        K^2 channels, as in checkpoints written before it existed).
    temperature : float
        Scale applied to the cosine-similarity cost volume before the heads.
    """

    num_labels: int = 15
    capture_range: float = 7.0
    stride: int = 4
    features: int = 24
    head_channels: int = 64
    head_bottleneck: int = 32
    temperature: float = 10.0

    def _check(self) -> None:
        if self.num_labels < 3 or self.num_labels % 2 == 0:
            raise ValueError(f"num_labels must be an odd integer >= 3, got {self.num_labels}")
        if self.num_labels > MAX_NUM_LABELS:
            raise ValueError(
                f"num_labels must be at most {MAX_NUM_LABELS} (the cost volume holds K^2 "
                f"values per control point), got {self.num_labels}"
            )
        if not 0 < self.capture_range <= MAX_CAPTURE_RANGE:
            raise ValueError(
                f"capture_range must be > 0 and <= {MAX_CAPTURE_RANGE} pixels, got "
                f"{self.capture_range}"
            )
        if not 1 <= self.stride <= MAX_STRIDE:
            raise ValueError(f"stride must be between 1 and {MAX_STRIDE}, got {self.stride}")
        for name in ("features", "head_channels"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_CHANNELS:
                raise ValueError(f"{name} must be between 1 and {MAX_CHANNELS}, got {value}")
        if not 0 <= self.head_bottleneck <= MAX_CHANNELS:
            raise ValueError(
                f"head_bottleneck must be between 0 and {MAX_CHANNELS}, got {self.head_bottleneck}"
            )
        if not 0 < self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be > 0 and <= {MAX_TEMPERATURE}, got {self.temperature}"
            )

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        # checkpoints written before the bottleneck existed have the plain 3 x 3 heads
        return {"head_bottleneck": 0, **data}


@dataclass(frozen=True)
class DataConfig(Config):
    """Synthetic pairs made from the MNI template that nilearn ships.

    Slices are axial, resampled to ``size`` x ``size``. Slices with index in
    ``train_slices`` are for training, ``test_slices`` for evaluation: the ranges
    do not overlap, so test anatomy is never seen in training.
    """

    size: int = 128
    train_slices: tuple[int, int] = (30, 88)
    test_slices: tuple[int, int] = (96, 136)
    max_displacement: float = 6.0
    smoothness: float = 10.0
    affine_scale: float = 0.03
    noise: float = 0.03
    bias: float = 0.25
    blur: float = 0.6

    def _check(self) -> None:
        if not MIN_IMAGE_SIDE <= self.size <= MAX_IMAGE_SIDE:
            raise ValueError(
                f"size must be between {MIN_IMAGE_SIDE} px (the smallest image register "
                f"accepts) and {MAX_IMAGE_SIDE} px, got {self.size}"
            )
        for name in ("train_slices", "test_slices"):
            start, stop = getattr(self, name)
            if not 0 <= start < stop <= MAX_COUNT:
                raise ValueError(f"{name} must be a range 0 <= start < stop, got {(start, stop)}")
        if self.max_displacement < 0 or self.smoothness <= 0:
            raise ValueError("max_displacement must be >= 0 and smoothness > 0")
        if min(self.affine_scale, self.noise, self.bias, self.blur) < 0:
            raise ValueError("affine_scale, noise, bias and blur must be >= 0")


@dataclass(frozen=True)
class TrainConfig(Config):
    """Supervised source training (both heads, soft labels).

    Source pairs are mono-modal pairs of each of ``source_contrasts``; with
    ``contrast_augmentation`` as many again are pairs whose fixed and moving images
    each get their own random contrast (:data:`~napari_discreg.core.data.template.AUGMENTED`),
    so that G learns features that do not depend on the contrast. Without it the
    source is the paper's protocol (mono-modal pairs only).
    """

    steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    source_contrasts: tuple[str, ...] = ("t1", "t2", "pd")
    contrast_augmentation: bool = True
    seed: int = 0

    def _check(self) -> None:
        if not 0 <= self.steps <= MAX_COUNT or not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(
                f"steps must be in [0, {MAX_COUNT}] and batch_size in [1, {MAX_BATCH}], got "
                f"{self.steps} and {self.batch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


SELECTION_CRITERIA: tuple[str, ...] = ("mind", "nmi", "agreement")
"""Names of the unsupervised keep-best criteria (:func:`~napari_discreg.core.registration.predict.selection_criterion`)."""


ADAPT_METHODS: tuple[str, ...] = ("self-training", "mcd")
"""How adaptation learns without labels: ``"self-training"`` (the default) on the
pipeline's refined fields, ``"mcd"`` the paper's maximum classifier discrepancy."""


@dataclass(frozen=True)
class AdaptConfig(Config):
    """Maximum classifier discrepancy adaptation (Saito et al. 2018).

    ``generator_updates`` is n, the number of step-C updates of G per iteration;
    ``source_weight_c`` keeps a fraction of the source cross-entropy in step C,
    which stabilises long runs (docs/method.md, "Adaptation"). With ``keep_best`` the model
    ends on the weights with the best unsupervised selection criterion seen every
    ``select_every`` iterations; without it, on the last iteration's weights.
    ``criterion`` names that score (MIND-SSC similarity or NMI of fixed vs warped);
    ``source_augmentation`` draws the source batches with contrast augmentation, as
    the shipped model was trained (:class:`TrainConfig`). ``holdout`` is the share of the
    target pairs set aside for that criterion and never adapted on (at least one pair
    when there are two or more; 0: select on the pairs adapted on), so the weights are
    judged on pairs the run did not fit (:func:`~napari_discreg.core.learning.adapt.holdout_split`).
    Self-training (``method="self-training"``) learns the model's fields refined by
    MIND-SSC instance optimisation (``pseudo_levels``, ``pseudo_smoothness``; ``flip``
    adds the mirrored pairs); when the refined fields match the pairs less than
    ``min_pseudo_gain`` better than the model's own, there is nothing to learn and the
    run keeps the model as it is (:func:`~napari_discreg.core.learning.self_train.pseudo_labels`).
    """

    # the default: self-training on the refined fields, 8 pairs of 192 x 192 in under
    # 30 s on 2 CPU cores (docs/benchmarks.md, "Adaptation that pays off"; the recipe was
    # chosen with benchmarks/adaptation_recipes.py). AdaptConfig.mcd() gives the paper's
    # maximum classifier discrepancy with its own short default.
    method: str = "self-training"
    steps: int = 200
    batch_size: int = 2
    lr: float = 3e-3
    discrepancy_weight: float = 1.0
    generator_updates: int = 1
    source_weight_c: float = 0.25
    select_every: int = 25
    keep_best: bool = True
    swd_projections: int = 128
    pemd_diagonals: bool = True
    criterion: str = "mind"
    source_augmentation: bool = True
    seed: int = 0
    holdout: float = 0.25
    pseudo_levels: int = 3
    pseudo_smoothness: float = 0.1
    flip: bool = True
    min_pseudo_gain: float = 0.25

    @classmethod
    def mcd(cls, **overrides) -> AdaptConfig:
        """The paper's maximum classifier discrepancy with its short default (36
        iterations, lr 2e-4, selection every 6: chosen on validation pairs,
        docs/benchmarks.md "Tuning the short default adaptation")."""
        return cls(**{"method": "mcd", "steps": 36, "lr": 2e-4, "select_every": 6, **overrides})

    @classmethod
    def for_method(cls, method: str, **overrides) -> AdaptConfig:
        """The default config of ``method`` (one of :data:`ADAPT_METHODS`)."""
        if method == "mcd":
            return cls.mcd(**overrides)
        return cls(**{"method": method, **overrides})

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        # a config recorded before self-training existed is an MCD run
        data.setdefault("method", "mcd")
        return data

    def _check(self) -> None:
        if self.method not in ADAPT_METHODS:
            raise ValueError(
                f"unknown adaptation method {self.method!r}; expected one of {ADAPT_METHODS}"
            )
        if self.pseudo_levels < 1 or self.pseudo_levels > 6 or not self.pseudo_smoothness >= 0:
            raise ValueError("pseudo_levels must be in 1..6 and pseudo_smoothness >= 0")
        if not 0.0 <= self.min_pseudo_gain < 1.0:
            raise ValueError(f"min_pseudo_gain must be in [0, 1), got {self.min_pseudo_gain}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.criterion not in SELECTION_CRITERIA:
            raise ValueError(
                f"unknown selection criterion {self.criterion!r}; expected one of {SELECTION_CRITERIA}"
            )
        if (
            self.steps < 0
            or self.batch_size < 1
            or self.generator_updates < 1
            or self.select_every < 1
        ):
            raise ValueError("steps must be >= 0; batch_size, generator_updates, select_every >= 1")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if (
            max(self.steps, self.generator_updates, self.select_every, self.swd_projections)
            > (MAX_COUNT)
            or self.batch_size > MAX_BATCH
        ):
            raise ValueError(
                f"steps, generator_updates, select_every and swd_projections must be at most "
                f"{MAX_COUNT} and batch_size at most {MAX_BATCH}"
            )
        if self.swd_projections < 1 or self.seed < 0:
            raise ValueError("swd_projections must be >= 1 and seed >= 0")
        if self.discrepancy_weight < 0 or self.source_weight_c < 0:
            raise ValueError("discrepancy_weight and source_weight_c must be >= 0")


FOREGROUND_THRESHOLD = 0.05
"""A pixel of a normalised image (robust percentiles to [0, 1]) is foreground above this:
the tissue the network's losses, the selection criterion and the quality figures count."""


@dataclass(frozen=True)
class FolderConfig(Config):
    """How the user's own image files become training slices (:mod:`.data.folders`).

    Attributes
    ----------
    axis : int or None
        Axis along which 3D volumes are sliced; ``None``: the reader's default
        (0 for TIFF/``.npy`` stacks, 2 for NIfTI volumes). 2D images ignore it.
    foreground_threshold : float
        A pixel is foreground where the file's normalised intensity (robust
        percentiles over the whole file, :func:`.preprocess.normalise_intensity`) is above it.
    min_foreground : float
        A slice is kept when its foreground area is at least this fraction of the
        largest foreground area of any slice of the same file (and >= 64 pixels).
    margin : float
        Background kept around the foreground bounding box, as a fraction of its
        larger side, before the box is fitted into ``size x size``.
    val_fraction : float
        Share of the files (subjects) held out for the evaluation at the end (a
        block of slices when there is a single file); 0 disables it.
    eval_pairs : int
        Number of held-out synthetic pairs of that evaluation.
    target_pairs : int
        Number of unlabelled target pairs made for adaptation.
    """

    axis: int | None = None
    foreground_threshold: float = FOREGROUND_THRESHOLD
    min_foreground: float = 0.25
    margin: float = 0.05
    val_fraction: float = 0.1
    eval_pairs: int = 32
    target_pairs: int = 128

    def _check(self) -> None:
        if not 0.0 <= self.foreground_threshold < 1.0:
            raise ValueError(
                f"foreground_threshold must be in [0, 1), got {self.foreground_threshold}"
            )
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], got {self.min_foreground}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.eval_pairs < 0 or self.target_pairs < 1:
            raise ValueError("eval_pairs must be >= 0 and target_pairs >= 1")
        if max(self.eval_pairs, self.target_pairs) > MAX_COUNT:
            raise ValueError(f"eval_pairs and target_pairs must be at most {MAX_COUNT}")
        if self.axis is not None and not -3 <= self.axis <= 2:
            raise ValueError(f"axis must be one of -3..2 (a volume's axes), got {self.axis}")


@dataclass(frozen=True)
class RefineConfig(Config):
    """Settings of :func:`~napari_discreg.core.registration.refine.refine_field`; defaults chosen on validation pairs from the
    training slices by ``benchmarks/tune_refine.py`` (never on the test pairs).

    Attributes
    ----------
    steps : int
        Adam iterations (0 disables the refinement).
    lr : float
        Adam learning rate, in pixels of displacement.
    smoothness : float
        Weight of the diffusion regulariser.
    grid_stride : int
        Spacing in pixels of the grid the field is optimised on.
    radius, dilation : int
        MIND-SSC patch radius and neighbour distance in pixels.
    levels : int
        Resolution levels, coarse to fine (images halved per level); each level runs
        ``steps`` iterations from the coarser level's field. More levels reach larger
        displacements.
    """

    steps: int = 50
    lr: float = 1.0
    smoothness: float = 0.03
    grid_stride: int = 2
    radius: int = 1
    dilation: int = 2
    levels: int = 2

    def _check(self) -> None:
        if self.levels < 1:
            raise ValueError(f"refine: levels must be >= 1, got {self.levels}")
        if self.steps < 0 or self.lr <= 0 or self.smoothness < 0:
            raise ValueError("refine: steps must be >= 0, lr > 0 and smoothness >= 0")
        if self.grid_stride < 1 or self.radius < 0 or self.dilation < 1:
            raise ValueError("refine: grid_stride >= 1, radius >= 0 and dilation >= 1 needed")
        if self.levels > MAX_LEVELS or self.steps > MAX_COUNT:
            raise ValueError(f"refine: at most {MAX_LEVELS} levels and {MAX_COUNT} steps")
        if max(self.grid_stride, self.radius, self.dilation) > MAX_STRIDE:
            raise ValueError(f"refine: grid_stride, radius and dilation must be <= {MAX_STRIDE}")


@dataclass(frozen=True)
class BSplineConfig(Config):
    """Settings of :func:`~napari_discreg.core.registration.bspline.bspline_refine`, the default
    refinement; chosen on validation pairs from the training slices by
    ``benchmarks/tune_bspline.py`` (never on the test pairs).

    Attributes
    ----------
    spacing : float
        Control-point spacing of the cubic B-spline in pixels of each level: the finest
        level's grid has this spacing in image pixels, a level downsampled by ``f`` a
        grid ``f`` times coarser (each level's field is refitted onto the next grid).
    levels : int
        Pyramid levels (images halved per level, coarse to fine); levels under 24 px
        a side are skipped.
    iterations : tuple of int
        Gauss-Newton steps per level, coarse to fine (the last entries are used when
        fewer levels run).
    smoothness : float
        Weight of the membrane regulariser on the control points, relative to the
        data term's mean curvature at the first step.
    damping : float
        Levenberg-Marquardt damping, relative to the same curvature.
    radius : int
        MIND-SSC patch radius in pixels.
    dilations : tuple of int
        MIND-SSC neighbour distances; the descriptors of each are averaged.
    symmetric : bool
        Use the mean of the fixed and the warped moving descriptors' gradients.
    """

    spacing: float = 12.0
    levels: int = 3
    iterations: tuple[int, ...] = (4, 3, 2)
    smoothness: float = 0.05
    damping: float = 1e-3
    radius: int = 1
    dilations: tuple[int, ...] = (2, 1)
    symmetric: bool = True

    def _check(self) -> None:
        if not (self.spacing >= 2 and math.isfinite(self.spacing)):
            raise ValueError(f"bspline: spacing must be a finite number >= 2, got {self.spacing}")
        if self.levels < 1 or len(self.iterations) < 1:
            raise ValueError("bspline: levels and iterations must not be empty")
        if any(int(n) != n or n < 0 for n in self.iterations):
            raise ValueError(
                f"bspline: iterations must be whole numbers >= 0, got {self.iterations}"
            )
        if not (self.smoothness >= 0 and self.damping >= 0):
            raise ValueError("bspline: smoothness and damping must be >= 0")
        if self.radius < 0 or not self.dilations or any(d < 1 for d in self.dilations):
            raise ValueError("bspline: radius >= 0 and dilations >= 1 needed")
        if self.levels > MAX_LEVELS or self.spacing > MAX_IMAGE_SIDE:
            raise ValueError(
                f"bspline: at most {MAX_LEVELS} levels and spacing <= {MAX_IMAGE_SIDE}"
            )
        if len(self.iterations) > MAX_LEVELS or sum(self.iterations) > MAX_COUNT:
            raise ValueError(f"bspline: at most {MAX_LEVELS} iteration counts, {MAX_COUNT} in all")
        if (
            self.radius > MAX_STRIDE
            or len(self.dilations) > MAX_LEVELS
            or max(self.dilations) > MAX_STRIDE
        ):
            raise ValueError(
                f"bspline: radius and dilations must be <= {MAX_STRIDE}, at most {MAX_LEVELS} dilations"
            )


DEFAULT_MODEL = ModelConfig()
DEFAULT_DATA = DataConfig()
__all__ = [
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "AdaptConfig",
    "FolderConfig",
    "RefineConfig",
]
