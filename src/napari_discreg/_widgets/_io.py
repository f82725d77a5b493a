"""File access for the widgets: images to open as layers, displacement fields to save/load.

Images are read with :mod:`napari_discreg.core.io` (PNG/JPEG, TIFF, NIfTI, ``.npy``).
Fields are written as float32 ``.npy`` or TIFF: ``(2, H, W)`` for one slice (the format
of :func:`napari_discreg.core.io.write_field`, also read by the command line) or
``(N, 2, H, W)`` for every slice of a stack, slice ``n`` along the registered axis.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.bmp *.tif *.tiff *.nii *.nii.gz *.npy);;All files (*)"
FIELD_FILTER = "Displacement field (*.npy *.tif *.tiff)"
CHECKPOINT_FILTER = "napari-discreg checkpoint (*.safetensors)"
_FIELD_EXTENSIONS = (".npy", ".tif", ".tiff")


def layer_name_for(path: str | os.PathLike) -> str:
    """The file name without its (possibly double) extension."""
    name = Path(path).name
    for ext in (".nii.gz", ".tiff", ".tif", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".npy"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """A 2D image ``(H, W)`` or a stack ``(N, H, W)`` (float32) from ``path``.

    Colour images become gray; NIfTI volumes are returned with their third voxel axis
    first (one axial slice per index). Raises ``ValueError`` with a clear message.
    """
    from ..core.io import read_stack

    stack = read_stack(path)
    return stack[0] if stack.shape[0] == 1 else stack


def _field_extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in _FIELD_EXTENSIONS:
        raise ValueError(
            f"{path}: displacement fields are saved as {', '.join(_FIELD_EXTENSIONS)}, not {ext!r}"
        )
    return ext


def save_field(path: str | os.PathLike, field: np.ndarray) -> Path:
    """Write a ``(2, H, W)`` or ``(N, 2, H, W)`` field (float32) atomically."""
    p = Path(path)
    arr = np.ascontiguousarray(field, dtype=np.float32)
    if not (arr.ndim in (3, 4) and arr.shape[-3] == 2):
        raise ValueError(
            f"a displacement field has shape (2, H, W) or (N, 2, H, W), got {arr.shape}"
        )
    if arr.ndim == 3:
        from ..core.io import write_field

        return write_field(p, arr)
    ext = _field_extension(p)
    tmp = p.with_name(f".{p.name}.partial{ext}")
    try:
        if ext == ".npy":
            np.save(tmp, arr, allow_pickle=False)
        else:
            import tifffile

            tifffile.imwrite(tmp, arr)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def load_field(path: str | os.PathLike) -> np.ndarray:
    """Read a field written by :func:`save_field`: ``(2, H, W)`` or ``(N, 2, H, W)`` float32."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    ext = _field_extension(p)
    try:
        if ext == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            import tifffile

            arr = tifffile.imread(p)
    except Exception as exc:  # corrupt or foreign files
        raise ValueError(
            f"{p}: cannot be read as a displacement field ({type(exc).__name__}: {exc})"
        ) from exc
    arr = np.asarray(arr)
    if not (arr.ndim in (3, 4) and arr.shape[-3] == 2) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(
            f"{p}: a displacement field has shape (2, H, W) or (N, 2, H, W) (row, col in "
            f"pixels), got {arr.shape} {arr.dtype}"
        )
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{p}: the displacement field contains NaN or infinite values")
    return arr
