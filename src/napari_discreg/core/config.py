"""Every default of napari-discreg lives here, once.

The dataclasses are plain, JSON-serialisable records: a checkpoint stores them
next to its weights so that a model can always be rebuilt exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


class Config:
    """What every settings record shares: ``to_dict`` (JSON-able) and ``from_dict``
    (rejects unknown keys with a clear message; JSON lists become the tuples the fields
    declare). Subclasses are frozen dataclasses; ``_upgrade`` fills keys that older
    records lack."""

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
        unknown = sorted(set(data) - set(declared))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        for key, value in data.items():
            if declared[key].startswith("tuple") and isinstance(value, list):
                data[key] = tuple(value)
        return cls(**data)


SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "default": ("discreg_t1_t2_pd.safetensors", "source model, contrast-augmented T1/T2/PD pairs"),
    "mono": ("discreg_mono_t1_t2_pd.safetensors", "paper protocol: mono-modal source only"),
}
"""Name -> (file in ``napari_discreg/weights``, one-line description) of every model
shipped with the package; each has its training record beside it (same stem, .json).
``load_model(name)`` loads one; ``"default"`` is what ``load_model()`` and
``register()`` use."""


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

    def __post_init__(self) -> None:
        if self.num_labels < 3 or self.num_labels % 2 == 0:
            raise ValueError(f"num_labels must be an odd integer >= 3, got {self.num_labels}")
        if not self.capture_range > 0:
            raise ValueError(f"capture_range must be > 0 pixels, got {self.capture_range}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.features < 1 or self.head_channels < 1:
            raise ValueError("features and head_channels must be >= 1")
        if self.head_bottleneck < 0:
            raise ValueError(f"head_bottleneck must be >= 0, got {self.head_bottleneck}")

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


@dataclass(frozen=True)
class TrainConfig(Config):
    """Supervised source training (both heads, soft labels).

    Source pairs are mono-modal pairs of each of ``source_contrasts``; with
    ``contrast_augmentation`` as many again are pairs whose fixed and moving images
    each get their own random contrast (:data:`~napari_discreg.core.data.AUGMENTED`),
    so that G learns features that do not depend on the contrast. Without it the
    source is the paper's protocol (mono-modal pairs only).
    """

    steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    source_contrasts: tuple[str, ...] = ("t1", "t2", "pd")
    contrast_augmentation: bool = True
    seed: int = 0


SELECTION_CRITERIA: tuple[str, ...] = ("mind", "nmi", "agreement")
"""Names of the unsupervised keep-best criteria (:func:`~napari_discreg.core.predict.selection_criterion`)."""


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
    the shipped model was trained (:class:`TrainConfig`).
    """

    # the short default: 8 pairs of 192 x 192 adapt in about 30 s on 2 CPU cores
    # (docs/benchmarks.md, "Short adaptation"; the settings were chosen on validation
    # pairs, "Tuning the short default adaptation")
    steps: int = 36
    batch_size: int = 2
    lr: float = 2e-4
    discrepancy_weight: float = 1.0
    generator_updates: int = 1
    source_weight_c: float = 0.25
    select_every: int = 6
    keep_best: bool = True
    swd_projections: int = 128
    pemd_diagonals: bool = True
    criterion: str = "mind"
    source_augmentation: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class FolderConfig(Config):
    """How the user's own image files become training slices (:mod:`.core.dataset`).

    Attributes
    ----------
    axis : int or None
        Axis along which 3D volumes are sliced; ``None``: the reader's default
        (0 for TIFF/``.npy`` stacks, 2 for NIfTI volumes). 2D images ignore it.
    foreground_threshold : float
        A pixel is foreground where the file's normalised intensity (robust
        percentiles over the whole file, :func:`.data.normalise_intensity`) is above it.
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
    foreground_threshold: float = 0.05
    min_foreground: float = 0.25
    margin: float = 0.05
    val_fraction: float = 0.1
    eval_pairs: int = 32
    target_pairs: int = 128

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class RefineConfig(Config):
    """Settings of :func:`~napari_discreg.core.refine.refine_field`; defaults chosen on validation pairs from the
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

    def __post_init__(self) -> None:
        if self.levels < 1:
            raise ValueError(f"refine: levels must be >= 1, got {self.levels}")
        if self.steps < 0 or self.lr <= 0 or self.smoothness < 0:
            raise ValueError("refine: steps must be >= 0, lr > 0 and smoothness >= 0")
        if self.grid_stride < 1 or self.radius < 0 or self.dilation < 1:
            raise ValueError("refine: grid_stride >= 1, radius >= 0 and dilation >= 1 needed")


@dataclass(frozen=True)
class BSplineConfig(Config):
    """Settings of :func:`~napari_discreg.core.bspline.bspline_refine`, the default
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

    def __post_init__(self) -> None:
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
