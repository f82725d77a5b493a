"""What a person looks at to judge a registration, as arrays: the review images
(checkerboard, difference), the foreground where arrows are drawn, the region a
similarity is measured over, and other images warped onto the field's grid.

Pure NumPy, shared by the napari widget (:mod:`napari_discreg._widgets._register_outputs`)
and the command line's report (``napari-discreg demo``).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from ..config import FOREGROUND_THRESHOLD
from ..files.imagefiles import luminance
from .preprocess import normalise_intensity

FOREGROUND = 0.1
"""A smoothed normalised intensity above this (fixed or warped image) is foreground, for
the displacement arrows (:func:`foreground_mask`)."""


def gray_image(image: np.ndarray) -> np.ndarray:
    """A 2D image as one channel: the luminance of RGB(A) ``(H, W, 3|4)`` (alpha
    dropped; for the review images and the foreground only), grayscale as it is."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return luminance(arr).astype(np.float32)
    return arr


def warp_to_grid(image: np.ndarray, field: np.ndarray, *, order: int = 1) -> np.ndarray:
    """``image`` (Hm, Wm) or (Hm, Wm, C) warped onto the field's grid (Hf, Wf):
    ``warped(r, c) = image(r + u0, c + u1)`` in the image's pixels (linear or nearest,
    the border value outside), for images of another size than the field, and colour.

    Integer images keep their dtype (rounded and clipped); labels need ``order=0``.
    """
    img = np.asarray(image)
    field = np.asarray(field, dtype=np.float64)
    rows, cols = np.meshgrid(
        np.arange(field.shape[1], dtype=np.float64),
        np.arange(field.shape[2], dtype=np.float64),
        indexing="ij",
    )
    coords = np.stack([rows + field[0], cols + field[1]])
    channels = img[..., None] if img.ndim == 2 else img
    out = np.stack(
        [
            map_coordinates(
                channels[..., k].astype(np.float32), coords, order=order, mode="nearest"
            )
            for k in range(channels.shape[-1])
        ],
        axis=-1,
    )
    out = out[..., 0] if img.ndim == 2 else out
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(img.dtype)
    return out.astype(np.float32)


def checkerboard(a: np.ndarray, b: np.ndarray, tile: int) -> np.ndarray:
    """Tiles of ``tile`` pixels taken alternately from ``a`` and ``b`` (same shape)."""
    r = (np.arange(a.shape[0]) // tile)[:, None]
    c = (np.arange(a.shape[1]) // tile)[None, :]
    return np.where((r + c) % 2 == 0, a, b).astype(np.float32)


def review_images(fixed: np.ndarray, warped: np.ndarray) -> dict[str, np.ndarray]:
    """The review view's images of one slice: checkerboard and difference (in [0, 1])."""
    nf, nw = normalise_intensity(fixed), normalise_intensity(warped)
    tile = max(8, min(fixed.shape) // 8)
    return {"checkerboard": checkerboard(nf, nw, tile), "difference": np.abs(nf - nw)}


def foreground_mask(image: np.ndarray, sigma: float) -> np.ndarray:
    """Where ``image`` holds tissue: its normalised intensity, smoothed over ``sigma``
    pixels (so that pixel noise in the background does not count), above FOREGROUND."""
    return gaussian_filter(normalise_intensity(image), max(float(sigma), 1.0)) > FOREGROUND


def foreground_vectors(vectors: np.ndarray, fixed: np.ndarray, warped: np.ndarray, stride: int):
    """The arrows whose control point lies on the foreground of the fixed or the warped
    image, so that the background stays clear."""
    sigma = stride / 2.0
    mask = foreground_mask(fixed, sigma) | foreground_mask(warped, sigma)
    pts = np.rint(vectors[:, 0]).astype(int)
    pts[:, 0] = np.clip(pts[:, 0], 0, mask.shape[0] - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, mask.shape[1] - 1)
    return vectors[mask[pts[:, 0], pts[:, 1]]]


def tissue_region(image: np.ndarray) -> np.ndarray | None:
    """The region a similarity (NMI) of ``image``'s pair is measured over: normalised
    intensity above :data:`~napari_discreg.core.config.FOREGROUND_THRESHOLD`; ``None``
    (the whole image) when that is nearly empty (under 16 pixels)."""
    mask = normalise_intensity(image) > FOREGROUND_THRESHOLD
    return mask if mask.sum() >= 16 else None
