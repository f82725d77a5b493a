"""Synthetic registration pairs made from the MNI ICBM152 2009a template shipped by nilearn.

Everything here works offline: the template volumes are read with nibabel from the
files that the ``nilearn`` package ships in ``nilearn/datasets/data/`` (nilearn
itself is not even imported, which saves seconds at start-up).

Slices and orientation
----------------------
The 1 mm template volume is ``197 x 233 x 189`` voxels (x: left -> right,
y: posterior -> anterior, z: inferior -> superior). Slice ``k`` of a
:class:`Template` is the axial plane ``z = k`` of the volume, displayed like a
radiological image: row 0 is the most anterior row (anterior up) and column 0 is
the patient's right. All 189 planes are kept, so ``DataConfig.train_slices`` and
``DataConfig.test_slices`` index the volume directly; they are half-open ranges
``[start, stop)`` like :func:`range`. Every slice is cropped to the bounding box
of the brain (the same box for all slices, plus a small margin) and resampled to
fit ``size x size`` with its aspect ratio kept, padded with zeros.

Contrasts
---------
``"t1"`` is the real template T1. ``"t2"`` and ``"pd"`` are synthesised from the
tissue probability maps with other tissue intensities (T2: CSF > GM > WM, PD:
GM > CSF > WM), so that they are not a monotone function of the T1. Every
contrast then gets a smooth multiplicative bias field, a Gaussian blur and
additive noise, and is normalised with :func:`normalise_intensity`.

Pairs
-----
:func:`make_pair` follows the convention of :mod:`napari_discreg.core.registration.warp`::

    fixed(x) = img_a(x + u(x)),    moving = img_b

so registering ``moving`` to ``fixed`` must recover ``u`` (``Pair.displacement``)
exactly: ``warp_numpy(moving, u)`` is aligned with ``fixed``.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from ..config import DataConfig
from ..memory import MemoryEstimate, check_memory
from ..registration.preprocess import normalise_intensity
from ..registration.warp import warp, warp_numpy

__all__ = [
    "CONTRASTS",
    "TISSUES",
    "TISSUE_INTENSITIES",
    "Template",
    "Pair",
    "load_template",
    "normalise_intensity",
    "synthesize_contrast",
    "random_field",
    "make_pair",
    "sample_batch",
    "fixed_test_pairs",
    "AUGMENTED",
    "augmented_contrast",
]

CONTRASTS: tuple[str, ...] = ("t1", "t2", "pd")
"""Contrasts :func:`synthesize_contrast` can make; only ``"t1"`` is a real image."""

AUGMENTED = "aug"
"""Pseudo-contrast for source training with contrast augmentation: every image drawn
with it gets its own random appearance (:func:`augmented_contrast`). Not in
:data:`CONTRASTS`, which lists the contrasts a benchmark evaluates."""

TISSUES: tuple[str, ...] = ("csf", "gm", "wm")
"""Tissue classes; their label values are 1, 2, 3 (0 is background)."""

TISSUE_INTENSITIES: dict[str, tuple[float, float, float]] = {
    "t2": (1.0, 0.55, 0.3),
    "pd": (0.75, 0.9, 0.65),
}
"""Intensity of (CSF, GM, WM) for the synthetic contrasts, before bias and noise."""

TEXTURE_WEIGHT: dict[str, float] = {"t1": 0.0, "t2": -0.6, "pd": 0.4}
"""Weight of the T1 fine texture added to a synthetic contrast.

The texture is the part of the T1 slice that its tissue maps do not explain (the
residual of a least-squares fit of T1 on CSF/GM/WM probabilities), so it adds
anatomical detail without re-introducing the T1 tissue contrast. The sign for T2 is
negative because T2 roughly inverts T1 contrast."""

_VOLUME_SHAPE = (197, 233, 189)
_VOLUME_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_MASK_THRESHOLD = 0.2  # as nilearn.datasets.load_mni152_brain_mask
_CROP_MARGIN = 8  # voxels of background kept around the brain bounding box


# --------------------------------------------------------------------------- template


@dataclass(frozen=True, eq=False)
class Template:
    """Axial slices of the MNI ICBM152 2009a template, resampled to ``size x size``.

    All image arrays are float32 with shape ``(n_slices, size, size)`` and are
    read-only (the template is cached and shared). Slice ``k`` is the axial plane
    ``z = k`` of the 1 mm volume; row 0 is anterior, column 0 is the patient's right.

    Attributes
    ----------
    t1 : numpy.ndarray
        Skull-stripped T1 (multiplied by ``mask``), scaled to [0, 1] over the volume.
    gm, wm, csf : numpy.ndarray
        Tissue probabilities in [0, 1], zero outside ``mask``;
        ``csf = clip(mask - gm - wm, 0, 1)``.
    mask : numpy.ndarray
        Brain mask, 0 or 1 (the template T1 above 0.2 of its maximum, as nilearn).
    labels : numpy.ndarray
        uint8 tissue map: 0 background, 1 CSF, 2 GM, 3 WM (argmax inside ``mask``).
    pixel_mm : float
        Size of one pixel in millimetres (the same along rows and columns).
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    pixel_mm: float

    @property
    def n_slices(self) -> int:
        """Number of axial slices (189)."""
        return int(self.t1.shape[0])

    @property
    def size(self) -> int:
        """Side length of every slice in pixels."""
        return int(self.t1.shape[-1])

    def tissue(self, name: str) -> np.ndarray:
        """Probability map ``(n_slices, size, size)`` of tissue ``name`` in :data:`TISSUES`."""
        if name not in TISSUES:
            raise ValueError(f"unknown tissue {name!r}; expected one of {TISSUES}")
        return getattr(self, name)


def _nilearn_data_dir() -> Path:
    """Folder of the data files shipped inside the installed ``nilearn`` package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "nilearn is not installed; it ships the MNI152 template used for training data "
            "(pip install nilearn)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def _read_volumes() -> dict[str, np.ndarray]:
    """The raw uint8 template volumes (T1, GM, WM), read once per process."""
    import nibabel as nib

    folder = _nilearn_data_dir()
    volumes = {}
    for key, name in _VOLUME_FILES.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"the MNI152 template file {path} is missing from the nilearn package"
            )
        data = np.asarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
        if data.shape != _VOLUME_SHAPE:
            raise ValueError(f"{name}: expected shape {_VOLUME_SHAPE}, got {data.shape}")
        data.setflags(write=False)
        volumes[key] = data
    return volumes


def _to_slices(volume: np.ndarray) -> np.ndarray:
    """(x, y, z) volume -> (z, rows, cols) stack, anterior up, patient right on the left."""
    return np.ascontiguousarray(volume[::-1, ::-1, :].transpose(2, 1, 0))


TEMPLATE_SLICES = 189
"""Axial slices of the template volume (every size has all of them)."""
TEMPLATE_BYTES_PER_PIXEL = 60
"""Peak bytes per pixel of every slice while :func:`load_template` builds a size (the
finished template keeps 21 of them): measured 90 / 60 / 54 at 128 / 256 / 512 px (peak
resident growth in a fresh process, the raw volumes already read; 278 / 749 / 2681 MB)."""
PAIR_BYTES_PER_PIXEL = 32
"""Bytes per pixel that one built-in pair keeps (images, field, labels and mask; 22
measured) plus its share of stacked fixed and moving images (8)."""
TEMPLATE_CACHE_BYTES = 1_000_000_000
"""The built templates kept for reuse hold at most this many bytes (the newest is always
kept): 128 and 192 px together take 0.2 GB, one 1024 px template 4.2 GB."""


def template_estimate(size: int, pairs: int = 0) -> MemoryEstimate:
    """What :func:`load_template` of ``size`` px (and ``pairs`` built-in pairs made from
    it) needs at its peak."""
    size, pairs = int(size), int(pairs)
    pixels = size * size
    total = (
        TEMPLATE_SLICES * pixels * TEMPLATE_BYTES_PER_PIXEL + pairs * pixels * PAIR_BYTES_PER_PIXEL
    )
    what = f"building the {size} px template" + (f" and {pairs} pairs from it" if pairs else "")
    return MemoryEstimate(total, what)


_TEMPLATES: OrderedDict[int, Template] = OrderedDict()
_TEMPLATES_LOCK = threading.Lock()


def load_template(size: int = 128, *, max_memory_gb: float | None = None) -> Template:
    """The template at ``size`` px (see :func:`_build_template`), from the cache when it
    was built before; a new size is refused before it is built when it would need more
    memory than ``max_memory_gb`` (default ``$NAPARI_DISCREG_MAX_MEMORY_GB``, else 8;
    never more than is available: :func:`~napari_discreg.core.memory.check_memory`)."""
    size = int(size)
    with _TEMPLATES_LOCK:
        if size in _TEMPLATES:
            _TEMPLATES.move_to_end(size)
            return _TEMPLATES[size]
    if size >= 8:
        check_memory(
            template_estimate(size),
            limit_gb=max_memory_gb,
            hint="use a smaller size (the built-in pairs are made at that size)",
        )
    template = _build_template(size)
    with _TEMPLATES_LOCK:
        _TEMPLATES[size] = template
        total = sum(_template_bytes(t) for t in _TEMPLATES.values())
        while len(_TEMPLATES) > 1 and total > TEMPLATE_CACHE_BYTES:
            total -= _template_bytes(_TEMPLATES.popitem(last=False)[1])
    return template


def _template_bytes(t: Template) -> int:
    return sum(a.nbytes for a in (t.t1, t.gm, t.wm, t.csf, t.mask, t.labels))


def _build_template(size: int = 128) -> Template:
    """Load the MNI ICBM152 2009a template shipped by nilearn as axial ``size x size`` slices.

    The volumes are read from the nilearn package data (no network access). Each
    axial slice is cropped to the brain's bounding box over the whole volume plus
    a margin of 8 voxels, smoothed against aliasing and resampled bilinearly so
    that the box fits ``size x size`` with its aspect ratio kept (zero padding).
    Results are cached: each ``size`` is built once per process (about a second).

    Parameters
    ----------
    size : int, optional
        Side length of the square slices in pixels.

    Returns
    -------
    Template
        All 189 axial slices; slice ``k`` is the plane ``z = k`` of the volume.
    """
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    raw = _read_volumes()
    t1 = _to_slices(raw["t1"]).astype(np.float32) / 255.0
    gm = _to_slices(raw["gm"]).astype(np.float32) / 255.0
    wm = _to_slices(raw["wm"]).astype(np.float32) / 255.0
    brain = t1 > _MASK_THRESHOLD * t1.max()

    # one in-plane box for every slice: the brain's bounding box plus a margin
    in_plane = brain.any(axis=0)
    rows = np.flatnonzero(in_plane.any(axis=1))
    cols = np.flatnonzero(in_plane.any(axis=0))
    r0, r1 = rows[0] - _CROP_MARGIN, rows[-1] + _CROP_MARGIN
    c0, c1 = cols[0] - _CROP_MARGIN, cols[-1] + _CROP_MARGIN
    extent = max(r1 - r0 + 1, c1 - c0 + 1)
    zoom = size / extent  # output pixels per voxel
    centre_in = np.array([(r0 + r1) / 2.0, (c0 + c1) / 2.0])
    centre_out = (size - 1) / 2.0
    # output (k, i, j) samples input (k, centre_in + (i - centre_out) / zoom)
    matrix = np.array([1.0, 1.0 / zoom, 1.0 / zoom])
    offset = np.array([0.0, *(centre_in - centre_out / zoom)])
    sigma = max(0.0, (1.0 / zoom - 1.0) / 2.0)  # anti-aliasing, as skimage.transform.rescale

    def resample(stack: np.ndarray) -> np.ndarray:
        if sigma > 0:
            stack = ndi.gaussian_filter(stack, sigma=(0.0, sigma, sigma), mode="constant")
        out = ndi.affine_transform(
            stack,
            matrix,
            offset=offset,
            output_shape=(stack.shape[0], size, size),
            order=1,
            mode="constant",
            cval=0.0,
        )
        return out.astype(np.float32)

    mask = (resample(brain.astype(np.float32)) >= 0.5).astype(np.float32)
    t1_s = np.clip(resample(t1), 0.0, None) * mask
    t1_s /= max(float(t1_s.max()), 1e-12)
    gm_s = np.clip(resample(gm), 0.0, 1.0) * mask
    wm_s = np.clip(resample(wm), 0.0, 1.0) * mask
    csf_s = np.clip(mask - gm_s - wm_s, 0.0, 1.0)
    labels = (np.argmax(np.stack([csf_s, gm_s, wm_s]), axis=0) + 1).astype(np.uint8)
    labels[mask == 0] = 0

    arrays = {"t1": t1_s, "gm": gm_s, "wm": wm_s, "csf": csf_s, "mask": mask, "labels": labels}
    for arr in arrays.values():
        arr.setflags(write=False)
    return Template(**arrays, pixel_mm=float(1.0 / zoom))


# --------------------------------------------------------------------------- intensities


@functools.lru_cache(maxsize=8)
def _bias_basis(height: int, width: int) -> np.ndarray:
    """Monomials ``r^a c^b`` with ``1 <= a + b <= 3`` on [-1, 1]^2, shape (9, H, W)."""
    r = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    c = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    terms = [r**a * c**b for a in range(4) for b in range(4) if 1 <= a + b <= 3]
    basis = np.stack([np.broadcast_to(t, (height, width)) for t in terms]).astype(np.float32)
    basis.setflags(write=False)
    return basis


def _bias_field(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field ``exp(strength * g)``, ``g`` a cubic polynomial, max |g| = 1."""
    basis = _bias_basis(*shape)
    coeffs = rng.standard_normal(basis.shape[0], dtype=np.float32)
    g = np.asarray(np.tensordot(coeffs, basis, axes=1), dtype=np.float32)
    g /= max(float(np.abs(g).max()), 1e-12)
    return np.exp(np.float32(strength) * g, dtype=np.float32)


def _t1_texture(template: Template, index: int) -> np.ndarray:
    """The part of the T1 slice that a linear model of its tissue maps does not explain."""
    mask = template.mask[index] > 0
    t1 = template.t1[index]
    out = np.zeros_like(t1)
    if mask.sum() < 4:
        return out
    design = np.stack(
        [template.csf[index][mask], template.gm[index][mask], template.wm[index][mask]], 1
    )
    coef, *_ = np.linalg.lstsq(design, t1[mask], rcond=None)
    out[mask] = t1[mask] - design @ coef
    return out


def _check_contrast(contrast: str) -> None:
    if contrast not in CONTRASTS and contrast != AUGMENTED:
        raise ValueError(
            f"unknown contrast {contrast!r}; expected one of {CONTRASTS} or {AUGMENTED!r}"
        )


def _remap(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random intensity remapping of a [0, 1]-ish image: a piecewise-linear curve
    through 6 random knots (non-monotone in general), or a random gamma (monotone)."""
    image = np.clip(image, 0.0, 1.0)
    if rng.random() < 0.5:
        knots = np.linspace(0.0, 1.0, 6)
        values = rng.random(6)
        values[0] = 0.0  # background stays dark, as in every MR contrast
        return np.interp(image, knots, values).astype(np.float32)
    return (image ** np.float32(np.exp(rng.uniform(-0.7, 0.7)))).astype(np.float32)


def augmented_contrast(template: Template, index: int, rng: np.random.Generator) -> np.ndarray:
    """A random noise-free appearance of slice ``index`` (contrast augmentation).

    With probability 0.3 the real T1 slice, otherwise a mixture of the tissue maps with
    intensities of CSF, GM and WM each uniform in [0, 1] (any ordering of the tissues)
    plus the T1 texture with a weight uniform in [-0.6, 0.6]; then, with probability
    0.7, a random intensity remapping (:func:`_remap`). Bias field, blur, normalisation
    and noise follow in :func:`_render`, with random strengths.
    """
    mask = template.mask[index]
    if rng.random() < 0.3:
        base = np.array(template.t1[index], dtype=np.float32)
        base = base / max(float(np.percentile(base[mask > 0], 99)), 1e-6) if mask.any() else base
    else:
        csf_i, gm_i, wm_i = rng.random(3)
        base = csf_i * template.csf[index] + gm_i * template.gm[index] + wm_i * template.wm[index]
        base = base + rng.uniform(-0.6, 0.6) * _t1_texture(template, index)
    base = np.clip(base, 0.0, None) * mask
    if rng.random() < 0.7:
        base = _remap(base, rng) * mask
    return base.astype(np.float32)


def _check_index(template: Template, index: int) -> int:
    index = int(index)
    if not 0 <= index < template.n_slices:
        raise IndexError(f"slice index {index} out of range [0, {template.n_slices})")
    return index


def _render(
    template: Template,
    index: int,
    contrast: str,
    rng: np.random.Generator,
    config: DataConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free normalised image and the noise to add to it (both (H, W) float32).

    Draws the same amount of randomness for every contrast, so that later draws
    (e.g. the deformation in :func:`make_pair`) do not depend on the contrast.
    """
    _check_contrast(contrast)
    index = _check_index(template, index)
    if contrast == AUGMENTED:
        # random strengths too, so that bias, blur and noise levels vary between the
        # two images of a pair (draws more randomness than the fixed contrasts)
        config = replace(
            config,
            bias=float(rng.uniform(0.0, 1.6)) * config.bias,
            blur=float(rng.uniform(0.0, 2.0)) * config.blur,
            noise=float(rng.uniform(0.3, 2.0)) * config.noise,
        )
        base = augmented_contrast(template, index, rng)
    elif contrast == "t1":
        base = np.array(template.t1[index], dtype=np.float32)
    else:
        csf_i, gm_i, wm_i = TISSUE_INTENSITIES[contrast]
        base = csf_i * template.csf[index] + gm_i * template.gm[index] + wm_i * template.wm[index]
        base = base + TEXTURE_WEIGHT[contrast] * _t1_texture(template, index)
        base = np.clip(base, 0.0, None) * template.mask[index]
    return appearance(base, template.mask[index], rng, config)


def appearance(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, config: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One rendering's bias field, blur and normalisation (over ``mask``, or the whole
    image when it holds fewer than 2 pixels), and the noise to add to it; the template's
    contrasts and the user's folder pairs (:mod:`.folders`) are rendered alike."""
    shape = image.shape
    out = image * _bias_field(shape, config.bias, rng)
    if config.blur > 0:
        out = ndi.gaussian_filter(out, sigma=config.blur, mode="constant")
    clean = normalise_intensity(out, mask=mask if mask.sum() >= 2 else None)
    noise = (np.float32(config.noise) * rng.standard_normal(shape, dtype=np.float32)).astype(
        np.float32
    )
    return clean, noise


def synthesize_contrast(
    template: Template,
    index: int,
    contrast: str,
    rng: np.random.Generator,
    config: DataConfig,
) -> np.ndarray:
    """One axial slice in contrast ``contrast``, with random bias field, blur and noise.

    ``"t1"`` is the real T1 slice. ``"t2"`` and ``"pd"`` are mixtures of the tissue
    maps with intensities :data:`TISSUE_INTENSITIES` (T2: CSF 1.0, GM 0.55, WM 0.3;
    PD: CSF 0.75, GM 0.9, WM 0.65) plus a faint T1 texture (:data:`TEXTURE_WEIGHT`).
    Every contrast is then multiplied by a smooth random bias field
    ``exp(config.bias * g)`` (``g`` a random cubic polynomial with max |g| = 1),
    blurred by a Gaussian of ``config.blur`` pixels, normalised with
    :func:`normalise_intensity` over the brain mask, and given additive Gaussian
    noise of standard deviation ``config.noise``; the result is clipped to [0, 1].

    Parameters
    ----------
    template : Template
        From :func:`load_template`.
    index : int
        Axial slice index in ``[0, template.n_slices)``.
    contrast : str
        One of :data:`CONTRASTS`.
    rng : numpy.random.Generator
        Source of the bias field and the noise.
    config : DataConfig
        Uses ``bias``, ``blur`` and ``noise``.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float32 image in [0, 1].
    """
    clean, noise = _render(template, index, contrast, rng, config)
    return np.clip(clean + noise, 0.0, 1.0)


# --------------------------------------------------------------------------- deformations


def random_field(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    max_displacement: float = DataConfig.max_displacement,
    smoothness: float = DataConfig.smoothness,
    affine_scale: float = DataConfig.affine_scale,
) -> np.ndarray:
    """A smooth random displacement field ``(2, H, W)`` in pixels (row, col).

    The sum of (1) a cubic B-spline deformation and (2) a small affine map, rescaled
    so that its largest magnitude ``max |u(x)|`` over the image is uniform in
    ``[0.5, 1] * max_displacement``.

    (1) Control points on a square grid of spacing ``2 * smoothness`` pixels (a
    cubic B-spline of that spacing smooths about as much as a Gaussian of
    ``smoothness`` pixels) get displacements drawn uniformly from the unit disc;
    the B-spline through them (``scipy.ndimage.map_coordinates``, order 3, no
    prefilter, so no overshoot) is scaled to a largest magnitude of
    ``max_displacement``. Uniform disc draws and a coarse grid make the field much
    less peaky than smoothed white noise, so the mean displacement is a larger
    fraction of the maximum. (2) ``(A - I)(x - c)`` about the image centre ``c``,
    with rotation angle (radians), two log-scales and a shear each uniform in
    ``[-affine_scale, affine_scale]``.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)``.
    rng : numpy.random.Generator
        Source of randomness (a fixed number of draws per call).
    max_displacement : float
        Upper bound of the largest displacement magnitude in pixels.
    smoothness : float
        Smoothness in pixels; the control-point spacing is ``max(1, 2 * smoothness)``.
    affine_scale : float
        Size of the random affine part (0 for none).

    Returns
    -------
    numpy.ndarray
        ``(2, H, W)`` float32 displacement in pixels, convention of
        :func:`napari_discreg.core.registration.warp.warp`.
    """
    height, width = (int(s) for s in shape)
    if height < 1 or width < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    if max_displacement < 0:
        raise ValueError(f"max_displacement must be >= 0, got {max_displacement}")
    spacing = max(1.0, 2.0 * float(smoothness))
    # control grid covering the image with one spare point beyond each border
    n_rows = int(np.ceil((height - 1) / spacing)) + 3
    n_cols = int(np.ceil((width - 1) / spacing)) + 3
    angle = rng.uniform(0.0, 2.0 * np.pi, size=(n_rows, n_cols))
    radius = np.sqrt(rng.uniform(0.0, 1.0, size=(n_rows, n_cols)))
    affine_params = rng.uniform(-1.0, 1.0, size=4)
    target = rng.uniform(0.5, 1.0) * float(max_displacement)

    row_pos = (np.arange(height) + ((n_rows - 1) * spacing - (height - 1)) / 2.0) / spacing
    col_pos = (np.arange(width) + ((n_cols - 1) * spacing - (width - 1)) / 2.0) / spacing
    coords = np.stack(np.meshgrid(row_pos, col_pos, indexing="ij"))
    control = (radius * np.cos(angle), radius * np.sin(angle))
    field = np.stack(
        [ndi.map_coordinates(c, coords, order=3, prefilter=False, mode="nearest") for c in control]
    ).astype(np.float32)
    field *= np.float32(max_displacement / max(float(np.sqrt((field**2).sum(0)).max()), 1e-12))

    if affine_scale > 0:
        angle, log_sr, log_sc, shear = affine_params * affine_scale
        cos, sin = np.cos(angle), np.sin(angle)
        rotation = np.array([[cos, -sin], [sin, cos]])
        scale_shear = np.array([[np.exp(log_sr), shear], [0.0, np.exp(log_sc)]])
        a_minus_i = rotation @ scale_shear - np.eye(2)
        rr, cc = np.meshgrid(
            np.arange(height, dtype=np.float32) - (height - 1) / 2.0,
            np.arange(width, dtype=np.float32) - (width - 1) / 2.0,
            indexing="ij",
        )
        field[0] += (a_minus_i[0, 0] * rr + a_minus_i[0, 1] * cc).astype(np.float32)
        field[1] += (a_minus_i[1, 0] * rr + a_minus_i[1, 1] * cc).astype(np.float32)

    largest = float(np.sqrt((field**2).sum(0)).max())
    if largest > 0:
        field *= np.float32(target / largest)
    return field.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- pairs


@dataclass
class Pair:
    """A synthetic registration pair with its ground truth.

    ``fixed(x) = img_a(x + displacement(x))`` and ``moving = img_b``, where
    ``img_a`` and ``img_b`` are the same slice in ``fixed_contrast`` and
    ``moving_contrast``; ``warp_numpy(moving, displacement)`` is aligned with ``fixed``.

    Attributes
    ----------
    fixed, moving : numpy.ndarray
        ``(H, W)`` float32 images in [0, 1].
    displacement : numpy.ndarray
        ``(2, H, W)`` float32 ground-truth field in pixels (row, col).
    fixed_labels, moving_labels : numpy.ndarray
        ``(H, W)`` uint8 tissue maps (0 background, 1 CSF, 2 GM, 3 WM);
        ``fixed_labels`` is the nearest-neighbour warp of ``moving_labels``.
    mask : numpy.ndarray
        ``(H, W)`` float32 brain mask (0/1) in the fixed frame.
    fixed_contrast, moving_contrast : str
        Contrasts of the two images.
    index : int
        Axial slice index in the template.
    """

    fixed: np.ndarray
    moving: np.ndarray
    displacement: np.ndarray
    fixed_labels: np.ndarray
    moving_labels: np.ndarray
    mask: np.ndarray
    fixed_contrast: str
    moving_contrast: str
    index: int


def deform_pair(
    a_clean: np.ndarray,
    a_noise: np.ndarray,
    b_clean: np.ndarray,
    b_noise: np.ndarray,
    rng: np.random.Generator,
    config: DataConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pair convention, in one place: draw ``u``, ``fixed = warp(a, u) + noise_a``,
    ``moving = b + noise_b`` (noise added after the warp so the warp does not smooth it),
    both clipped to [0, 1]. Returns ``(fixed, moving, u)``."""
    u = random_field(
        a_clean.shape,
        rng,
        max_displacement=config.max_displacement,
        smoothness=config.smoothness,
        affine_scale=config.affine_scale,
    )
    fixed = np.clip(warp_numpy(a_clean, u) + a_noise, 0.0, 1.0)
    moving = np.clip(b_clean + b_noise, 0.0, 1.0)
    return fixed, moving, u


def make_pair(
    template: Template,
    index: int,
    fixed_contrast: str,
    moving_contrast: str,
    rng: np.random.Generator,
    config: DataConfig,
) -> Pair:
    """Make one synthetic pair of slice ``index`` with a random deformation.

    In order, draws ``img_a`` (``fixed_contrast``), ``img_b`` (``moving_contrast``;
    its own bias field and noise even when the contrasts match) and the field ``u``
    from :func:`random_field`, then sets ``fixed = warp(img_a, u)`` (bilinear),
    ``moving = img_b``, ``fixed_labels`` and ``mask`` the nearest-neighbour warps of
    the template labels and brain mask, and ``moving_labels`` the template labels.
    The warp is applied before ``img_a``'s noise is added, so the fixed image is not
    smoothed twice: with ``config.noise == 0``, ``fixed`` equals
    ``warp_numpy(synthesize_contrast(template, index, fixed_contrast, rng, config), u)``
    for the same random stream. The number of random draws does not depend on the
    contrasts, so the same seed gives the same ``u`` for every contrast pair.

    Parameters
    ----------
    template : Template
        From :func:`load_template`.
    index : int
        Axial slice index.
    fixed_contrast, moving_contrast : str
        Contrasts in :data:`CONTRASTS`.
    rng : numpy.random.Generator
        Source of all randomness.
    config : DataConfig
        Deformation and appearance settings.

    Returns
    -------
    Pair
    """
    index = _check_index(template, index)
    a_clean, a_noise = _render(template, index, fixed_contrast, rng, config)
    b_clean, b_noise = _render(template, index, moving_contrast, rng, config)
    fixed, moving, u = deform_pair(a_clean, a_noise, b_clean, b_noise, rng, config)
    # labels and mask in one nearest-neighbour warp
    maps = np.stack([template.labels[index], template.mask[index]]).astype(np.float32)
    warped = warp(torch.from_numpy(maps)[None], torch.from_numpy(u)[None], mode="nearest")[
        0
    ].numpy()
    return Pair(
        fixed=fixed.astype(np.float32, copy=False),
        moving=moving.astype(np.float32, copy=False),
        displacement=u,
        fixed_labels=np.rint(warped[0]).astype(np.uint8),
        moving_labels=np.array(template.labels[index], dtype=np.uint8),
        mask=(warped[1] > 0.5).astype(np.float32),
        fixed_contrast=fixed_contrast,
        moving_contrast=moving_contrast,
        index=index,
    )


def _slice_range(config: DataConfig, split: str) -> tuple[int, int]:
    if split == "train":
        lo, hi = config.train_slices
    elif split == "test":
        lo, hi = config.test_slices
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not hi > lo:
        raise ValueError(f"empty {split} slice range [{lo}, {hi})")
    return int(lo), int(hi)


def _check_template(template: Template, config: DataConfig) -> None:
    if template.size != config.size:
        raise ValueError(
            f"template slices are {template.size} px but config.size is {config.size}; "
            f"use load_template({config.size})"
        )
    for split in ("train", "test"):
        lo, hi = _slice_range(config, split)
        if lo < 0 or hi > template.n_slices:
            raise ValueError(
                f"{split} slice range [{lo}, {hi}) exceeds the template's {template.n_slices} slices"
            )


def sample_batch(
    template: Template,
    split: str,
    batch_size: int,
    rng: np.random.Generator,
    config: DataConfig,
    *,
    pairs: tuple[tuple[str, str], ...] = (("t1", "t1"),),
) -> dict[str, torch.Tensor]:
    """A random batch of pairs from the ``"train"`` or ``"test"`` slice range.

    Each item draws its slice uniformly from the split's half-open range
    (``config.train_slices`` or ``config.test_slices``) and its
    ``(fixed, moving)`` contrasts uniformly from ``pairs``, then calls
    :func:`make_pair`.

    Parameters
    ----------
    template : Template
        From ``load_template(config.size)``.
    split : str
        ``"train"`` or ``"test"``.
    batch_size : int
        Number of pairs B.
    rng : numpy.random.Generator
        Source of all randomness.
    config : DataConfig
        Data settings.
    pairs : tuple of (str, str), optional
        Candidate ``(fixed_contrast, moving_contrast)`` pairs.

    Returns
    -------
    dict of str to torch.Tensor
        ``fixed``, ``moving``, ``mask`` (B, 1, H, W) float32; ``displacement``
        (B, 2, H, W) float32 pixels; ``fixed_labels``, ``moving_labels``
        (B, 1, H, W) int64.
    """
    _check_template(template, config)
    lo, hi = _slice_range(config, split)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = tuple((str(f), str(m)) for f, m in pairs)
    if not pairs:
        raise ValueError("pairs must name at least one (fixed, moving) contrast pair")
    for f, m in pairs:
        _check_contrast(f)
        _check_contrast(m)
    items = []
    for _ in range(batch_size):
        index = int(rng.integers(lo, hi))
        fixed_contrast, moving_contrast = pairs[int(rng.integers(len(pairs)))]
        items.append(make_pair(template, index, fixed_contrast, moving_contrast, rng, config))

    def stack(name: str, dtype: type[np.generic]) -> torch.Tensor:
        arr = np.stack([getattr(p, name) for p in items]).astype(dtype, copy=False)
        if arr.ndim == 3:
            arr = arr[:, None]
        return torch.from_numpy(np.ascontiguousarray(arr))

    return {
        "fixed": stack("fixed", np.float32),
        "moving": stack("moving", np.float32),
        "displacement": stack("displacement", np.float32),
        "mask": stack("mask", np.float32),
        "fixed_labels": stack("fixed_labels", np.int64),
        "moving_labels": stack("moving_labels", np.int64),
    }


def fixed_test_pairs(
    template: Template,
    config: DataConfig,
    *,
    n: int,
    fixed_contrast: str,
    moving_contrast: str,
    seed: int,
) -> list[Pair]:
    """A deterministic list of ``n`` evaluation pairs from the test slice range.

    With ``n`` at most the number of test slices the slices are spread evenly
    over the range; otherwise they cycle through it. Pair ``i`` is made with
    ``numpy.random.default_rng([seed, i])``, so the same ``(n, seed)`` gives the
    same slices and the same deformations for every contrast pair (e.g. T1-T2 and
    T1-PD benchmarks use identical fields).

    Parameters
    ----------
    template : Template
        From ``load_template(config.size)``.
    config : DataConfig
        Data settings; ``test_slices`` picks the slices.
    n : int
        Number of pairs.
    fixed_contrast, moving_contrast : str
        Contrasts in :data:`CONTRASTS`.
    seed : int
        Seed (non-negative).

    Returns
    -------
    list of Pair
    """
    _check_template(template, config)
    _check_contrast(fixed_contrast)
    _check_contrast(moving_contrast)
    lo, hi = _slice_range(config, "test")
    span = hi - lo
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= span:
        indices = [lo + (i * span) // n for i in range(n)]
    else:
        indices = [lo + i % span for i in range(n)]
    return [
        make_pair(
            template,
            index,
            fixed_contrast,
            moving_contrast,
            np.random.default_rng([int(seed), i]),
            config,
        )
        for i, index in enumerate(indices)
    ]
