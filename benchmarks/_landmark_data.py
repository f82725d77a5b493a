"""The real histology pairs of ``benchmarks/landmarks.py`` and their landmark metrics.

Data: ``/work/shared/data/histology`` (see its README.md): stain pairs of consecutive
sections with landmarks placed by people (ANHIR / CIMA, from the BIRL repository), plus
BIRL's artificial set (one reference image moved by known rigid, affine and elastic maps).

Conventions used everywhere here:

* Images are ``(H, W, 3)`` float32 RGB in [0, 1].
* Points are ``(N, 2)`` float64 arrays of ``(row, col)`` in pixels, the centre of the top
  left pixel at ``(0, 0)``. The ImageJ CSVs give ``X`` = column, ``Y`` = row.
* A registration is judged by a *mapping*: a function ``(N, 2) fixed points -> (N, 2)
  moving points``. For a displacement field ``u`` of shape ``(2, Hf, Wf)`` on the fixed
  grid, in moving pixels (our convention, ``warped(r, c) = moving(r + u0, c + u1)``),
  :func:`field_mapping` gives ``p -> p + u(p)`` with ``u`` interpolated bilinearly.
* TRE of a landmark: distance between the mapped fixed landmark and the moving landmark.
  Relative TRE: TRE / the diagonal of the fixed image. Robustness (ANHIR): the share of
  landmarks whose TRE is smaller than without registration (``p -> p``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

ENV_DATA = "NAPARI_DISCREG_HISTOLOGY"
"""Environment variable that overrides the data folder."""

Mapping = Callable[[np.ndarray], np.ndarray]
"""``(N, 2)`` fixed points (row, col) -> ``(N, 2)`` moving points (row, col)."""


@dataclass(frozen=True)
class PairSpec:
    """One fixed/moving pair of the data folder."""

    name: str
    folder: str
    fixed: str
    moving: str
    real: bool  # a real stain pair (in the summary) or BIRL's artificial set


PAIRS: tuple[PairSpec, ...] = (
    PairSpec(
        "rat-kidney", "rat-kidney", "Rat-Kidney_HE.jpg", "Rat-Kidney_PanCytokeratin.jpg", True
    ),
    PairSpec(
        "lung-lesion",
        "lung-lesion",
        "Izd2-29-041-w35_HE.jpg",
        "Izd2-29-041-w35_proSPC.jpg",
        True,
    ),
    *(
        PairSpec(
            f"artificial-{kind}",
            "artificial",
            "artificial_reference.jpg",
            f"artificial_moving-{kind}.jpg",
            False,
        )
        for kind in ("rigid", "affine", "elastic")
    ),
)
"""Every pair, the two real stain pairs first."""


@dataclass
class LandmarkPair:
    """One pair at working size.

    ``fixed_points[i]`` and ``moving_points[i]`` are the same structure (landmark
    ``indices[i]`` of both CSVs); ``scale`` is the one factor both images were resized by.
    """

    name: str
    real: bool
    fixed: np.ndarray
    moving: np.ndarray
    fixed_points: np.ndarray
    moving_points: np.ndarray
    indices: np.ndarray
    scale: float

    @property
    def diagonal(self) -> float:
        """Diagonal of the fixed image in pixels (the ANHIR normalisation of TRE)."""
        h, w = self.fixed.shape[:2]
        return float(np.hypot(h, w))


def default_data_dir() -> Path:
    """``$NAPARI_DISCREG_HISTOLOGY``, else ``shared/data/histology`` beside the checkout."""
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "histology"


def missing_files(data_dir: Path, specs=PAIRS) -> list[Path]:
    """The image and landmark files of ``specs`` that ``data_dir`` lacks."""
    out = []
    for spec in specs:
        for name in (spec.fixed, spec.moving):
            for path in (data_dir / spec.folder / name, _csv(data_dir / spec.folder / name)):
                if not path.is_file():
                    out.append(path)
    return sorted(set(out))


def _csv(image_path: Path) -> Path:
    return image_path.with_suffix(".csv")


def read_landmarks(path) -> dict[int, tuple[float, float]]:
    """ImageJ CSV (``,X,Y``) -> {index: (row, col)}."""
    points: dict[int, tuple[float, float]] = {}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader)]
        if header[1:3] != ["X", "Y"]:
            raise ValueError(f"{path}: expected the columns ',X,Y', got {header}")
        for row in reader:
            if not row or not row[0].strip():
                continue
            index = int(float(row[0]))
            points[index] = (float(row[2]), float(row[1]))  # (Y, X) = (row, col)
    return points


def matched_landmarks(fixed_csv, moving_csv) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Landmarks present in both files, matched by index: (indices, fixed, moving)."""
    f, m = read_landmarks(fixed_csv), read_landmarks(moving_csv)
    common = sorted(set(f) & set(m))
    if not common:
        raise ValueError(f"{fixed_csv} and {moving_csv} share no landmark index")
    return (
        np.asarray(common, dtype=np.int64),
        np.asarray([f[i] for i in common], dtype=np.float64),
        np.asarray([m[i] for i in common], dtype=np.float64),
    )


def read_rgb(path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` float32 RGB in [0, 1]."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def rescale_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    return tuple(max(1, int(round(s * scale))) for s in shape)  # type: ignore[return-value]


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize ``(H, W[, C])`` by exactly ``scale`` (not per-axis rounded factors).

    Output pixel ``i`` samples the input at ``(i + 0.5) / scale - 0.5`` (pixel centres),
    after a Gaussian anti-aliasing blur of ``(1 / scale - 1) / 2`` px when shrinking (as
    ``skimage.transform.rescale``); the output shape is the rounded ``scale * shape``, so a
    point ``p`` of the input is ``rescale_points(p, scale)`` of the output, the same for
    every image resized with the same ``scale``.
    """
    img = np.asarray(image, dtype=np.float32)
    channels = img[..., None] if img.ndim == 2 else img
    out_hw = rescale_shape(channels.shape[:2], scale)
    sigma = max(0.0, (1.0 / scale - 1.0) / 2.0)
    inv = 1.0 / scale
    offset = 0.5 * inv - 0.5
    planes = []
    for k in range(channels.shape[-1]):
        plane = channels[..., k]
        if sigma > 0:
            plane = ndi.gaussian_filter(plane, sigma, mode="nearest")
        planes.append(
            ndi.affine_transform(
                plane, [inv, inv], offset=offset, output_shape=out_hw, order=1, mode="nearest"
            )
        )
    out = np.clip(np.stack(planes, axis=-1), 0.0, 1.0).astype(np.float32)
    return out[..., 0] if img.ndim == 2 else out


def rescale_points(points: np.ndarray, scale: float) -> np.ndarray:
    """Pixel coordinates of ``points`` after :func:`rescale_image` by ``scale``."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5


def load_pair(data_dir: Path, spec: PairSpec, size: int | None) -> LandmarkPair:
    """``spec`` at working size: both images resized by one factor so that the fixed image's
    long side is ``size`` px (``None``: full size), landmarks scaled alike."""
    folder = Path(data_dir) / spec.folder
    fixed = read_rgb(folder / spec.fixed)
    moving = read_rgb(folder / spec.moving)
    indices, fp, mp = matched_landmarks(_csv(folder / spec.fixed), _csv(folder / spec.moving))
    scale = 1.0 if size is None else float(size) / max(fixed.shape[:2])
    if scale != 1.0:
        fixed, moving = rescale_image(fixed, scale), rescale_image(moving, scale)
        fp, mp = rescale_points(fp, scale), rescale_points(mp, scale)
    return LandmarkPair(spec.name, spec.real, fixed, moving, fp, mp, indices, scale)


def load_pairs(data_dir: Path, size: int | None, specs=PAIRS) -> list[LandmarkPair]:
    return [load_pair(data_dir, spec, size) for spec in specs]


# --------------------------------------------------------------------------- metrics


def field_mapping(displacement: np.ndarray) -> Mapping:
    """The mapping ``p -> p + u(p)`` of a ``(2, Hf, Wf)`` displacement (bilinear, edges
    extended)."""
    u = np.asarray(displacement, dtype=np.float64)
    if u.ndim != 3 or u.shape[0] != 2:
        raise ValueError(f"a displacement must have shape (2, H, W), got {u.shape}")

    def mapping(points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        coords = p.T  # (2, N)
        du = np.stack([ndi.map_coordinates(c, coords, order=1, mode="nearest") for c in u])
        return p + du.T

    return mapping


def identity_mapping(points: np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=np.float64).copy()


def tre(mapping: Mapping, fixed_points: np.ndarray, moving_points: np.ndarray) -> np.ndarray:
    """Per-landmark TRE (px): ``|mapping(fixed) - moving|``."""
    mapped = np.asarray(mapping(np.asarray(fixed_points, dtype=np.float64)), dtype=np.float64)
    if mapped.shape != np.shape(moving_points):
        raise ValueError(f"mapped points {mapped.shape} != landmarks {np.shape(moving_points)}")
    return np.linalg.norm(mapped - moving_points, axis=1)


def pair_metrics(pair: LandmarkPair, mapping: Mapping) -> dict[str, float | list[float]]:
    """Median TRE (px), median relative TRE, robustness, mean and max TRE of one pair."""
    errors = tre(mapping, pair.fixed_points, pair.moving_points)
    before = tre(identity_mapping, pair.fixed_points, pair.moving_points)
    return {
        "median_tre": float(np.median(errors)),
        "median_rtre": float(np.median(errors) / pair.diagonal),
        "mean_tre": float(np.mean(errors)),
        "max_tre": float(np.max(errors)),
        "robustness": float(np.mean(errors < before)),
        "tre": [float(e) for e in errors],
    }
