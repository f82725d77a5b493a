"""Checks and preparation of user images: every user-reachable entry point calls these.

Errors a user can cause raise :class:`ValueError` with a message that says what
to do; nothing here modifies the caller's arrays.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Above this many pixels the cost volume and head activations would need several GB:
# refuse before allocating anything and tell the user to downsample or crop.
MAX_PIXELS = 2048 * 2048


def normalise_intensity(
    image: np.ndarray,
    *,
    low: float = 1.0,
    high: float = 99.0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Robust percentile normalisation of an image to [0, 1] (float32).

    The upper bound is the ``high`` percentile of the foreground. The lower bound
    is the ``low`` percentile of the foreground, or the median of the background
    if that is lower, so that a dark background stays darker than every tissue
    (a skull-stripped image keeps its zero background at 0). The result is
    ``clip((image - lower) / (upper - lower), 0, 1)``. This is the one intensity
    normaliser of napari-discreg.

    Parameters
    ----------
    image : numpy.ndarray
        Image of any shape. Non-finite values are ignored and map to 0.
    low, high : float, optional
        Percentiles (0-100) that map to 0 and 1.
    mask : numpy.ndarray, optional
        Foreground mask (non-zero = foreground), same shape as ``image``. Without
        it the foreground is every pixel above ``min + 1% of (max - min)``.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape, values in [0, 1]. A constant image (or
        one without finite values) maps to zeros.
    """
    img = np.asarray(image, dtype=np.float32)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros(img.shape, dtype=np.float32)
    values = img[finite]
    vmin, vmax = float(values.min()), float(values.max())
    if not vmax > vmin:
        return np.zeros(img.shape, dtype=np.float32)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != img.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {img.shape}")
        fg = (mask != 0) & finite
    else:
        fg = finite & (img > vmin + 0.01 * (vmax - vmin))
    bg = finite & ~fg
    if fg.sum() < 2:
        fg = finite
    fg_values = img[fg]
    lower, upper = np.percentile(fg_values, [low, high])
    if bg.any():
        lower = min(float(lower), float(np.median(img[bg])))
    if not upper - lower > 1e-6 * max(abs(upper), abs(lower), 1e-12):
        lower, upper = vmin, vmax  # e.g. a binary image: fall back to min-max
    out = (img - np.float32(lower)) / np.float32(upper - lower)
    out = np.where(finite, out, 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def min_image_size(num_labels: int, capture_range: float, stride: int) -> int:
    """Smallest side an image may have for a model with this label grid."""
    return int(max(2 * np.ceil(capture_range) + 2, 4 * stride))


def as_image(array, name: str = "image") -> np.ndarray:
    """Validate one 2D image and return it as a new C-contiguous float32 array.

    Accepts any real numeric or bool dtype, any strides; rejects RGB(A), 1D/3D/4D,
    NaN/inf and constant images with a message that says what to do.
    """
    try:
        arr = np.asarray(array)
    except Exception as exc:  # pragma: no cover - exotic array-likes
        raise ValueError(f"{name}: cannot be read as an array ({exc})") from exc
    if (
        arr.dtype == object
        or np.iscomplexobj(arr)
        or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool)
    ):
        raise ValueError(f"{name}: expected a real-valued numeric image, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4:
        raise ValueError(
            f"{name}: looks like an RGB/RGBA image {arr.shape}; registration needs one "
            "grayscale channel: convert it first (e.g. skimage.color.rgb2gray)"
        )
    if arr.ndim > 2 and sum(s != 1 for s in arr.shape) == 2:
        arr = arr.reshape([s for s in arr.shape if s != 1])  # e.g. (1, H, W) or (H, W, 1)
    if arr.ndim != 2:
        hint = " pick one slice of the volume (e.g. volume[k])" if arr.ndim >= 3 else ""
        raise ValueError(
            f"{name}: expected a 2D image, got shape {arr.shape};{hint or ' reshape it'}"
        )
    if arr.size > MAX_PIXELS:
        raise ValueError(
            f"{name}: {arr.shape[0]} x {arr.shape[1]} is larger than the "
            f"{int(MAX_PIXELS**0.5)} x {int(MAX_PIXELS**0.5)} pixels napari-discreg registers "
            "in one piece; downsample it (e.g. skimage.transform.rescale) or crop the region "
            "of interest"
        )
    with np.errstate(over="ignore"):
        out = np.array(arr, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        if np.isfinite(arr).all():  # finite, but beyond float32 (e.g. float64 1e300)
            peak = float(np.abs(np.asarray(arr, dtype=np.float64)).max())
            raise ValueError(
                f"{name}: values up to {peak:.3g} are beyond the float32 range registration "
                "computes in (3.4e38); rescale the image first (e.g. image / abs(image).max())"
            )
        raise ValueError(
            f"{name}: contains NaN or infinite values; replace them first (e.g. numpy.nan_to_num)"
        )
    if out.size == 0:
        raise ValueError(f"{name}: the image is empty (shape {out.shape}); nothing to register")
    if float(out.max()) == float(out.min()):
        raise ValueError(
            f"{name}: the image is constant (every pixel is {float(out.flat[0])}); nothing to register"
        )
    return out


def check_tensor_pair(
    fixed: torch.Tensor, moving: torch.Tensor, initial: torch.Tensor | None, *, caller: str
) -> None:
    """Validate normalised (B, 1, H, W) images and an optional (B, 2, H, W) start field."""
    if fixed.shape != moving.shape or fixed.ndim != 4 or fixed.shape[1] != 1:
        raise ValueError(
            f"{caller} expects fixed and moving (B, 1, H, W) of one shape, got "
            f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    b, _, h, w = fixed.shape
    if initial is not None and initial.shape != (b, 2, h, w):
        raise ValueError(f"initial field must be {(b, 2, h, w)}, got {tuple(initial.shape)}")


def check_image(image, name: str, *, min_size: int) -> np.ndarray:
    """Validate one 2D image of a pair (:func:`as_image`) and that it holds the label
    range: fixed and moving are checked one by one, since their sizes may differ."""
    out = as_image(image, name)
    if min(out.shape) < min_size:
        raise ValueError(
            f"{name}: {out.shape[0]} x {out.shape[1]} pixels is smaller than the model's label "
            f"range needs ({min_size} px per side); use larger images or upsample them"
        )
    return out


def check_stack(array, name: str) -> np.ndarray:
    """Validate a stack of 2D images (N, H, W) (a single 2D image becomes N = 1)."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a stack of 2D images (N, H, W), got shape {arr.shape}")
    return np.stack([as_image(a, f"{name}[{i}]") for i, a in enumerate(arr)])


def pad_to_multiple(batch: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom/right by edge replication to multiples of ``multiple``."""
    h, w = batch.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return batch
    return F.pad(batch, (0, pw, 0, ph), mode="replicate")


def network_input(images: np.ndarray, stride: int, device=None) -> torch.Tensor:
    """Images (H, W) or (N, H, W) -> (N, 1, H', W') float32: each image normalised
    (:func:`normalise_intensity`) and padded to a multiple of
    ``stride``, as the network reads them everywhere (register, evaluation, adaptation)."""
    stack = np.asarray(images)
    stack = stack[None] if stack.ndim == 2 else stack
    normalised = np.stack([normalise_intensity(a) for a in stack])
    return pad_to_multiple(torch.from_numpy(normalised)[:, None], stride).to(device)
