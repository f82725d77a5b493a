"""Reading and writing images and displacement fields (no Qt, no napari).

Formats
-------
========================  ===========================  =====================================
extension                 read with                    notes
========================  ===========================  =====================================
``.png .jpg .jpeg .bmp``  :mod:`imageio` (Pillow)      RGB(A) -> gray (see below)
``.tif .tiff``            :mod:`tifffile`              2D image or 3D stack; float kept
``.nii .nii.gz``          :mod:`nibabel`               2D or 3D; 4D only with one volume
``.npy``                  :func:`numpy.load`           ``allow_pickle=False``
========================  ===========================  =====================================

Every reader returns ``float32``. Conventions, stated once here:

* **Colour.** An RGB or RGBA image (PNG/JPEG, or a TIFF whose samples axis holds 3
  or 4 channels) loses its alpha channel and is converted with
  :func:`skimage.color.rgb2gray`, which rescales integer images to [0, 1]; a
  gray-with-alpha PNG keeps its gray channel. Intensity scale does not matter for
  registration: :func:`napari_discreg.register` normalises every image itself.
* **Singleton axes** (e.g. a ``(1, H, W)`` stack or an ``(X, Y, Z, 1)`` NIfTI) are
  dropped before anything else, so ``axis`` counts the remaining axes.
* **Volumes and stacks.** :func:`read_image` takes one 2D slice of a 3D array:
  along ``axis`` (default 0 for TIFF and ``.npy`` stacks, 2 for NIfTI volumes, i.e.
  the third voxel axis) at ``index`` (default: the middle slice). For 2D files
  ``axis`` and ``index`` are ignored. NIfTI data are used in voxel-array order,
  with no reorientation by the affine (:func:`write_image` writes an identity
  affine, so a written image reads back unchanged).

Reading is bounded: the shape in a file's header (NIfTI header, TIFF series, PNG
size, ``.npy`` header) is checked against a voxel limit (:data:`DEFAULT_MAX_VOXELS`,
``$NAPARI_DISCREG_MAX_VOXELS`` or ``max_voxels=``) before any data are decoded, so a
small compressed file that declares a huge volume is refused without allocating it.

Writing is atomic: every writer
(:func:`~napari_discreg.core.files.atomic.replace_atomically`) writes a uniquely named
temporary file in the destination folder, flushes it to disk (``fsync``), renames it
onto the destination (:func:`os.replace`) and syncs the folder, so an interrupted or
failed write never leaves a partial file behind and keeps the previous file; a full
disk raises an :class:`OSError` that says so, with the bytes needed.

Errors a user can cause (missing file, unknown extension, corrupt file, a slice
index out of range, an array of the wrong shape) raise :class:`ValueError` with a
message that names the file; a destination that cannot be written raises
:class:`OSError`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ENV_PREFIX, limit_setting
from .atomic import file_extension, replace_atomically
from .itk_field import (
    CONVENTION,
    ITK_FIELD_EXTENSIONS,
    itk_field_shape,
    read_itk_field,
    write_itk_field,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "FIELD_EXTENSIONS",
    "read_image",
    "read_stack",
    "write_image",
    "write_field",
    "read_field",
    "save_field",
    "load_field",
    "image_format",
    "max_voxels",
    "DEFAULT_MAX_VOXELS",
]

_FORMATS: dict[str, str] = {
    ".png": "png",
    ".jpg": "png",
    ".jpeg": "png",
    ".bmp": "png",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".npy": "npy",
}
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(_FORMATS)
"""Extensions :func:`read_image` and :func:`read_stack` understand (lower case)."""

WRITE_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".npy", ".nii", ".nii.gz", ".png")
"""Extensions :func:`write_image` writes."""

FIELD_EXTENSIONS: tuple[str, ...] = (".npy", ".tif", ".tiff", *ITK_FIELD_EXTENSIONS)
"""Extensions of displacement-field files (:func:`write_field`, :func:`save_field`):
``.npy``/TIFF hold napari-discreg's own ``(2, H, W)`` pixel arrays; ``.mha``/``.nii``/
``.nii.gz`` hold ITK displacement-field images (:mod:`napari_discreg.core.files.itk_field`)."""

_FORMAT_NAMES = {
    "png": "a PNG/JPEG/BMP image",
    "tiff": "a TIFF file",
    "nifti": "a NIfTI file",
    "npy": "a NumPy .npy file",
}
_DEFAULT_AXIS = {"png": 0, "tiff": 0, "npy": 0, "nifti": 2}


# --------------------------------------------------------------------------- helpers


def image_format(path: str | os.PathLike) -> str:
    """``"png"`` (PNG, JPEG or BMP), ``"tiff"``, ``"nifti"`` or ``"npy"`` for a file name.

    Raises
    ------
    ValueError
        For an extension napari-discreg does not read.
    """
    p = Path(path)
    ext = file_extension(p)
    try:
        return _FORMATS[ext]
    except KeyError:
        raise ValueError(
            f"{p}: unknown image extension {ext or '(none)'!r}; napari-discreg reads "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        ) from None


def _check_readable(path: str | os.PathLike) -> tuple[Path, str]:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file")
    if not p.is_file():
        raise ValueError(f"{p}: is not a file (a folder?); give an image file")
    return p, image_format(p)


def _check_numeric(arr: np.ndarray, p: Path) -> None:
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise ValueError(f"{p}: holds {arr.dtype} data; expected a real-valued numeric image")
    if arr.ndim < 2 or arr.size == 0:
        raise ValueError(
            f"{p}: holds an array of shape {arr.shape}; expected a 2D image or a 3D stack"
        )


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3 or 4) colour -> (...) gray: alpha dropped, then skimage's rgb2gray (which
    rescales integer images to [0, 1]). The readers and the review images use it."""
    from skimage.color import rgb2gray

    return rgb2gray(rgb[..., :3])


MAX_VOXELS_ENV = ENV_PREFIX + "MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**28
"""The most voxels (pixels times slices; colour samples not counted) a file may hold:
268,435,456, e.g. a 645^3 volume, 1 GiB as float32. Set another limit with the
environment variable ``NAPARI_DISCREG_MAX_VOXELS`` or the readers' ``max_voxels``."""


def max_voxels(value: int | None = None) -> int:
    """The voxel limit in force: ``value``, else ``$NAPARI_DISCREG_MAX_VOXELS``, else
    :data:`DEFAULT_MAX_VOXELS`."""
    limit, _ = limit_setting(value, MAX_VOXELS_ENV, DEFAULT_MAX_VOXELS, unit="voxels", integer=True)
    return int(limit)


def _check_size(p: Path, shape: tuple[int, ...], dtype: Any, limit: int, colour: bool) -> None:
    """Refuse, from the header alone, a file whose array is larger than ``limit`` voxels."""
    dims = [int(s) for s in shape]
    if colour and len(dims) > 2 and dims[-1] in (3, 4):
        dims = dims[:-1]
    count = int(np.prod(dims, dtype=np.float64)) if dims else 0
    if count > limit:
        try:
            itemsize = np.dtype(dtype).itemsize
        except TypeError:
            itemsize = 0
        name = np.dtype(dtype).name if itemsize else ""
        raw = (
            f"{count * itemsize / 2**30:.1f} GiB as {name}, " if name not in ("", "float32") else ""
        )
        raise ValueError(
            f"{p}: its header declares an array of shape {tuple(int(s) for s in shape)} "
            f"({count:,} voxels; {raw}{count * 4 / 2**30:.1f} GiB as float32), more than the "
            f"limit of {limit:,} voxels; crop or downsample it, or raise the limit with "
            f"{MAX_VOXELS_ENV}"
        )


def _npy_header(p: Path) -> tuple[tuple[int, ...], np.dtype]:
    with open(p, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise ValueError("the file does not start with the .npy header")
        fh.seek(0)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), dtype


def _load(p: Path, fmt: str, limit: int | None = None) -> tuple[np.ndarray, int | None]:
    """The file's array with colour converted to gray and singleton axes dropped, and the
    axis of its channels where the file declares one that is not colour (a TIFF's
    samples or ImageJ channels: ``YXS`` with 24 samples), else None.

    The shape and dtype in the file's header are checked against the voxel limit
    (:func:`max_voxels`) before anything is decoded.
    """
    limit = max_voxels(limit)
    axes = ""
    try:
        if fmt == "png":
            import imageio.v3 as iio
            from PIL import Image

            with Image.open(p) as im:  # reads the header only
                if im.format not in ("PNG", "JPEG", "MPO"):  # MPO: a camera's JPEG
                    raise ValueError(
                        f"{p}: the file is a {im.format} image, not the PNG or JPEG its name "
                        "says; convert it to PNG or TIFF"
                    )
                _check_size(p, (im.height, im.width), np.uint8, limit, False)
            # pillow only: imageio would otherwise try every plugin it knows on a bad file
            arr = np.asarray(iio.imread(p, plugin="pillow"))
            if arr.ndim == 3 and arr.shape[-1] in (3, 4):
                arr = luminance(arr)
            elif arr.ndim == 3 and arr.shape[-1] == 2:  # gray + alpha
                arr = arr[..., 0]
        elif fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(str(p)) as tif:
                series = tif.series[0]
                axes = series.axes
                _check_size(p, series.shape, series.dtype, limit, axes.endswith("S"))
                arr = np.asarray(series.asarray())
            if axes.endswith("S") and arr.shape[-1] in (3, 4):
                arr = luminance(arr)
        elif fmt == "nifti":
            import nibabel as nib

            img: Any = nib.load(str(p))  # a Nifti1/2Image (nibabel types it as the base class)
            _check_size(p, img.header.get_data_shape(), img.header.get_data_dtype(), limit, False)
            arr = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            shape, dtype = _npy_header(p)
            _check_size(p, shape, dtype, limit, False)
            arr = np.load(str(p), allow_pickle=False)
    except ValueError as exc:
        if str(p) in str(exc):
            raise
        raise ValueError(f"{p}: cannot be read as {_FORMAT_NAMES[fmt]} ({exc})") from exc
    except Exception as exc:  # any reader failure on a corrupt file becomes one clear error
        raise ValueError(
            f"{p}: cannot be read as {_FORMAT_NAMES[fmt]} ({type(exc).__name__}: {exc})"
        ) from exc
    _check_numeric(arr, p)
    if len(axes) != arr.ndim:  # colour converted: the axes no longer say what is where
        axes = ""
    if arr.ndim > 2:
        if axes:
            axes = "".join(a for a, n in zip(axes, arr.shape, strict=True) if n != 1)
        arr = arr.reshape([s for s in arr.shape if s != 1] or [1, 1])
        if arr.ndim < 2:  # e.g. (1, 1, W): keep it 2D
            arr = arr.reshape(1, -1)
    if arr.ndim > 3:
        hint = " (a 4D NIfTI series: extract one volume first)" if fmt == "nifti" else ""
        raise ValueError(
            f"{p}: holds an array of shape {arr.shape}; napari-discreg reads 2D images and "
            f"3D stacks/volumes{hint}"
        )
    channel = next((i for i, a in enumerate(axes) if a in "SC"), None) if arr.ndim == 3 else None
    return arr, channel


def _channels_message(p: Path, shape: tuple[int, ...], channel: int) -> str:
    h, w = (n for i, n in enumerate(shape) if i != channel)
    return (
        f"{p}: a {h} x {w} image with {shape[channel]} channels (axis {channel}); "
        "registration reads one channel"
    )


def _check_axis(p: Path, shape: tuple[int, ...], axis: int) -> int:
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{p}: axis {axis} is out of range for a volume of shape {shape}")
    return axis % len(shape)


# ---------------------------------------------------------------------------- readers


def read_image(
    path: str | os.PathLike,
    *,
    axis: int | None = None,
    index: int | None = None,
    max_voxels: int | None = None,
) -> np.ndarray:
    """Read one 2D image (float32) from a PNG/JPEG, TIFF, NIfTI or ``.npy`` file.

    Parameters
    ----------
    path : str or path-like
        The file; its format comes from the extension (see the module docstring).
    axis : int, optional
        For 3D files: the axis to slice along. Default 0 for TIFF and ``.npy``
        stacks, 2 for NIfTI volumes; for a TIFF whose axes declare channels other
        than colour (``YXS`` with 24 samples, ImageJ ``CYX``) the channel axis.
    index : int, optional
        For 3D files: which slice along ``axis`` (0-based). Default: the middle one,
        ``n // 2``; for a multi-channel TIFF it must be given (which channel).
    max_voxels : int, optional
        Refuse a file whose header declares more voxels than this, before reading
        its data (default :data:`DEFAULT_MAX_VOXELS`, or ``$NAPARI_DISCREG_MAX_VOXELS``).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32.

    Raises
    ------
    ValueError
        Missing file, unknown extension, unreadable or corrupt file, non-numeric
        data, an array with more than three non-singleton axes, more voxels than
        ``max_voxels``, or ``axis``/``index`` out of range. The message names the file.
    """
    p, fmt = _check_readable(path)
    arr, channel = _load(p, fmt, max_voxels)
    if arr.ndim == 3:
        if axis is None and channel is not None:  # a multi-channel image, not a volume
            if index is None:
                raise ValueError(
                    f"{_channels_message(p, arr.shape, channel)}: choose it with the slice "
                    f"index (index=K, --index K; 0 to {arr.shape[channel] - 1})"
                )
            axis = channel
        ax = _check_axis(p, arr.shape, _DEFAULT_AXIS[fmt] if axis is None else int(axis))
        n = arr.shape[ax]
        i = n // 2 if index is None else int(index)
        if not 0 <= i < n:
            raise ValueError(
                f"{p}: slice index {i} is out of range: the volume of shape {arr.shape} has "
                f"{n} slices along axis {ax} (0 to {n - 1})"
            )
        arr = np.take(arr, i, axis=ax)
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_stack(
    path: str | os.PathLike, *, axis: int | None = None, max_voxels: int | None = None
) -> np.ndarray:
    """Read a stack or volume file as ``(N, H, W)`` float32 slices along ``axis``.

    ``axis`` defaults as in :func:`read_image` (0 for TIFF/``.npy``, 2 for NIfTI);
    a 2D file gives ``N = 1``; ``max_voxels`` as in :func:`read_image`. Raises
    :class:`ValueError` like :func:`read_image`.
    """
    p, fmt = _check_readable(path)
    arr, channel = _load(p, fmt, max_voxels)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        if axis is None and channel is not None:
            raise ValueError(
                f"{_channels_message(p, arr.shape, channel)}, not a stack of slices; to use "
                f"its channels as slices give their axis (axis={channel}, --axis {channel})"
            )
        ax = _check_axis(p, arr.shape, _DEFAULT_AXIS[fmt] if axis is None else int(axis))
        arr = np.moveaxis(arr, ax, 0)
    return np.ascontiguousarray(arr, dtype=np.float32)


# ---------------------------------------------------------------------------- writers


def _png_array(arr: np.ndarray, p: Path) -> np.ndarray:
    if arr.ndim != 2:
        raise ValueError(
            f"{p}: PNG holds one 2D gray image, got shape {arr.shape}; use .tif or .npy"
        )
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if not np.isfinite(arr).all():
        raise ValueError(f"{p}: the image holds NaN or infinite values, which PNG cannot store")
    if np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0:
        if arr.max() <= 255:
            return arr.astype(np.uint8)
        if arr.max() <= 65535:
            return arr.astype(np.uint16)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(arr.shape)
    return np.round(scaled * 65535.0).astype(np.uint16)


def _nifti_array(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype in (np.int64, np.uint64):  # nibabel refuses 64-bit integers by default
        info = np.iinfo(np.int32)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(np.int32)
        return arr.astype(np.float64)
    return arr


def _write_raw(p: Path, arr: np.ndarray, ext: str) -> None:
    if ext in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(str(p), arr, photometric="minisblack")
    elif ext == ".npy":
        with open(p, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
    elif ext in (".nii", ".nii.gz"):
        import nibabel as nib

        nib.save(nib.Nifti1Image(_nifti_array(arr), np.eye(4)), str(p))
    else:  # .png, array already converted by _png_array
        import imageio.v3 as iio

        iio.imwrite(p, arr, plugin="pillow", extension=".png")


def _atomic_write(
    path: str | os.PathLike,
    arr: np.ndarray,
    allowed: tuple[str, ...],
    what: str,
    *,
    writer: Callable[[Path], None] | None = None,
) -> Path:
    p = Path(path)
    ext = file_extension(p)
    if ext not in allowed:
        raise ValueError(
            f"{p}: cannot write {what} as {ext or '(no extension)'!r}; use {', '.join(allowed)}"
        )
    if ext == ".png":
        arr = _png_array(arr, p)
    if not p.parent.is_dir():
        raise OSError(f"cannot write {p}: the folder {p.parent} does not exist")
    if p.is_dir():
        raise OSError(f"cannot write {p}: it is a folder")
    # ``writer``: a format of its own (e.g. displacement fields for ITK)
    write = writer if writer is not None else (lambda tmp: _write_raw(tmp, arr, ext))
    return replace_atomically(p, write, nbytes=arr.nbytes)


def write_image(path: str | os.PathLike, array) -> Path:
    """Write an image (2D; 3D stacks also for TIFF, ``.npy`` and NIfTI) atomically.

    Formats by extension:

    * ``.tif``/``.tiff`` (tifffile) and ``.npy``: dtype and values kept exactly
      (float32 stays float32).
    * ``.nii``/``.nii.gz`` (nibabel): identity affine, dtype kept (bool -> uint8,
      64-bit integers -> int32 when they fit).
    * ``.png`` (2D only, lossy for floats): ``uint8``/``uint16`` and integer images
      within 0-255 (-> uint8) or 0-65535 (-> uint16) are written unchanged, bool as
      0/255; anything else (floats, negative integers) is **rescaled** linearly from
      its min-max to 0-65535 and written as 16-bit. Use TIFF or ``.npy`` to keep
      values.

    The data go to a temporary file in the same folder that is then renamed onto
    ``path``, so a failure never leaves a partial file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        Unknown extension, non-numeric array, or an array PNG cannot hold.
    OSError
        The folder does not exist or cannot be written.
    """
    p = Path(path)
    arr = np.asarray(array)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise ValueError(f"{p}: cannot write {arr.dtype} data as an image")
    if arr.ndim not in (2, 3):
        raise ValueError(f"{p}: expected a 2D image or a 3D stack, got shape {arr.shape}")
    return _atomic_write(p, np.ascontiguousarray(arr), WRITE_EXTENSIONS, "an image")


def _check_field(field: np.ndarray, name: str) -> np.ndarray:
    if field.ndim != 3 or field.shape[0] != 2 or min(field.shape[1:], default=0) < 1:
        raise ValueError(
            f"{name}: a displacement field must have shape (2, H, W) (row, col components "
            f"in pixels), got {field.shape}"
        )
    if not (np.issubdtype(field.dtype, np.number) or field.dtype == bool) or np.iscomplexobj(field):
        raise ValueError(f"{name}: a displacement field must be real-valued, got {field.dtype}")
    return _check_finite(np.ascontiguousarray(field, dtype=np.float32), name)


def _check_finite(field: np.ndarray, name: str) -> np.ndarray:
    """``field`` itself; ValueError when it holds NaN or infinite values (refused when
    written, so that nothing is saved that :func:`load_field` would then refuse)."""
    if not np.isfinite(field).all():
        bad = int(field.size - np.count_nonzero(np.isfinite(field)))
        raise ValueError(
            f"{name}: the displacement field contains NaN or infinite values ({bad} of "
            f"{field.size})"
        )
    return field


def _field_writer(
    field: np.ndarray, ext: str, spacing, origin=None
) -> Callable[[Path], None] | None:
    """How a field file of extension ``ext`` is written (``None``: plain ``.npy``).

    TIFF fields carry :data:`~napari_discreg.core.files.itk_field.CONVENTION` as JSON in their
    ImageDescription; ITK fields carry theirs in the format's own header; a ``.npy``
    holds the bare array (its format has no room for metadata).
    """
    if ext in ITK_FIELD_EXTENSIONS:
        return lambda tmp: write_itk_field(tmp, field, spacing, ext=ext, origin=origin)
    if ext in (".tif", ".tiff"):
        meta = {**CONVENTION, "shape": list(field.shape)}
        if spacing is not None:
            meta["spacing"] = [float(v) for v in spacing]
        if origin is not None:
            meta["origin"] = [float(v) for v in origin]

        def write_tiff(tmp: Path) -> None:
            import tifffile

            tifffile.imwrite(
                str(tmp),
                field,
                photometric="minisblack",
                description=json.dumps(meta),
                metadata=None,
            )

        return write_tiff
    return None


def write_field(path: str | os.PathLike, displacement, *, spacing=None, origin=None) -> Path:
    """Write a ``(2, H, W)`` displacement field (pixels, row/col), float32.

    ``.npy`` and TIFF hold the array itself (TIFF with the convention and units as
    JSON in its description); ``.mha``, ``.nii`` and ``.nii.gz`` an ITK displacement
    field in physical units (``spacing``: the pixel size in (row, col) order, default
    1; ``origin``: the first pixel's position in the same order, default 0), which
    SimpleITK, transformix and ANTs read (:mod:`~napari_discreg.core.files.itk_field`).
    Atomic like :func:`write_image`. Raises :class:`ValueError` for another shape,
    NaN or infinite values or another extension.
    """
    p = Path(path)
    field = _check_field(np.asarray(displacement), str(p))
    writer = _field_writer(field, file_extension(p), spacing, origin)
    return _atomic_write(p, field, FIELD_EXTENSIONS, "a displacement field", writer=writer)


def _read_field_file(p: Path) -> np.ndarray:
    """The array of a field file, unchecked (ValueError naming the file). The shape its
    header declares is checked against the voxel limit (:func:`max_voxels`) first."""
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    ext = file_extension(p)
    if ext not in FIELD_EXTENSIONS:
        raise ValueError(
            f"{p}: displacement fields are read from {', '.join(FIELD_EXTENSIONS)}, not {ext!r}"
        )
    limit = max_voxels()
    try:
        if ext == ".npy":
            shape, dtype = _npy_header(p)
            _check_size(p, shape, dtype, limit, False)
            arr = np.load(str(p), allow_pickle=False)
        elif ext in ITK_FIELD_EXTENSIONS:
            _check_size(p, itk_field_shape(p, ext), np.float32, limit, False)
            arr = read_itk_field(p, ext)  # back to pixels, (row, col)
        else:
            import tifffile

            with tifffile.TiffFile(str(p)) as tif:
                series = tif.series[0]
                _check_size(p, series.shape, series.dtype, limit, False)
                arr = series.asarray()
    except ValueError as exc:
        if str(p) in str(exc):  # already names the file (the size check)
            raise
        raise ValueError(f"{p}: cannot be read as a displacement field ({exc})") from exc
    except Exception as exc:
        raise ValueError(
            f"{p}: cannot be read as a displacement field ({type(exc).__name__}: {exc})"
        ) from exc
    return np.asarray(arr)


def read_field(path: str | os.PathLike) -> np.ndarray:
    """Read a displacement field written by :func:`write_field`: ``(2, H, W)`` float32.

    An ITK field (``.mha``, ``.nii``, ``.nii.gz``) comes back in pixels of its own grid,
    its spacing and direction honoured as ITK reads them
    (:func:`~napari_discreg.core.files.itk_field.itk_geometry` says where that grid lies).

    Raises
    ------
    ValueError
        Missing or corrupt file, an extension not in :data:`FIELD_EXTENSIONS`, an array
        that is not ``(2, H, W)``, NaN or infinite values, or an ITK grid that ITK
        refuses too (a zero, NaN or infinite spacing, a singular direction).
    """
    p = Path(path)
    return _check_field(_read_field_file(p), str(p))


def save_field(path: str | os.PathLike, field, *, spacing=None, origin=None) -> Path:
    """Write one field ``(2, H, W)`` or a stack ``(N, 2, H, W)`` (float32) atomically.

    A stack holds the field of slice ``n`` of a volume at index ``n`` (as an ITK file:
    a 3D field with zero z components over the whole volume, ``spacing`` then in
    (slice, row, col) order, like ``origin``); one field is written by :func:`write_field` (the format
    the command line reads and writes).
    Raises :class:`ValueError` for another shape, NaN or infinite values or an
    extension not in :data:`FIELD_EXTENSIONS`, :class:`OSError` when the file cannot be
    written.
    """
    p = Path(path)
    arr = np.ascontiguousarray(field, dtype=np.float32)
    if not (arr.ndim in (3, 4) and arr.shape[-3] == 2):
        raise ValueError(
            f"a displacement field has shape (2, H, W) or (N, 2, H, W), got {arr.shape}"
        )
    if arr.ndim == 3:
        return write_field(p, arr, spacing=spacing, origin=origin)
    _check_finite(arr, str(p))
    writer = _field_writer(arr, file_extension(p), spacing, origin)
    return _atomic_write(p, arr, FIELD_EXTENSIONS, "a displacement field", writer=writer)


def load_field(path: str | os.PathLike) -> np.ndarray:
    """Read a field written by :func:`save_field`: ``(2, H, W)`` or ``(N, 2, H, W)`` float32.

    Raises
    ------
    ValueError
        Missing or corrupt file, an extension not in :data:`FIELD_EXTENSIONS`, an
        array of another shape or a non-numeric one, or NaN/infinite values.
    """
    p = Path(path)
    arr = _read_field_file(p)
    if not (arr.ndim in (3, 4) and arr.shape[-3] == 2) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(
            f"{p}: a displacement field has shape (2, H, W) or (N, 2, H, W) (row, col in "
            f"pixels), got {arr.shape} {arr.dtype}"
        )
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{p}: the displacement field contains NaN or infinite values")
    return arr


def read_spacing(path: str | os.PathLike, *, axis: int | None = None) -> tuple[float, float]:
    """The physical pixel size (row, col) of the 2D image :func:`read_image` gives for
    ``path`` and ``axis``: from a NIfTI header's pixdim (the two axes other than the
    slice axis), else ``(1.0, 1.0)``. A zero, negative or non-finite value in the header
    counts as 1 (as ITK reads a missing spacing)."""
    p, fmt = _check_readable(path)
    if fmt != "nifti":
        return (1.0, 1.0)
    import nibabel as nib

    try:
        img: Any = nib.load(str(p))
        zooms = [float(z) for z in img.header.get_zooms()]
        shape = img.header.get_data_shape()
    except Exception as exc:
        raise ValueError(f"{p}: cannot read its NIfTI header ({exc})") from exc
    dims = [i for i, n in enumerate(shape) if n != 1]
    if len(dims) == 3:
        ax = _DEFAULT_AXIS[fmt] if axis is None else int(axis) % 3
        dims = [d for d in dims if d != ax]
    dims = (dims + [0, 1])[:2]
    out = [zooms[d] if d < len(zooms) else 1.0 for d in dims]
    return tuple(z if math.isfinite(z) and z > 0 else 1.0 for z in out)  # type: ignore[return-value]
