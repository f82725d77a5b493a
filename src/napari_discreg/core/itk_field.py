"""Displacement fields as ITK displacement-field images (``.mha``, ``.nii``, ``.nii.gz``).

napari-discreg's own convention (:mod:`napari_discreg.core.warp`) is a ``(2, H, W)``
array in **pixels**, (row, col) components, used by backward warping::

    warped(r, c) = moving(r + u[0, r, c], c + u[1, r, c])

ITK's :class:`DisplacementFieldTransform` (what SimpleITK, elastix's transformix with
``(Transform "DeformationFieldTransform")`` and ANTs' ``antsApplyTransforms`` read)
maps a point ``x`` of the fixed (output) image to ``x + d(x)`` in the moving image, with
``d`` a vector image in **physical units** and components in ITK's axis order (x = the
column axis, y = the row axis). The two are the same backward map, so the conversion is::

    d[..., 0] = u[1] * spacing_col      (x)
    d[..., 1] = u[0] * spacing_row      (y)

on an image with identity direction whose pixel ``(r, c)`` is at
``(origin_col + c * spacing_col, origin_row + r * spacing_row)`` (origin 0 unless given;
napari's ``translate`` of the fixed layer). A stack of 2D fields ``(N, 2, H, W)`` (one per
slice of a volume) is written as a 3D field ``(N, H, W, 3)`` with zero z components, so
it applies to the whole volume.

Both files are written without ITK: MetaImage (``.mha``, ITK's native format) by hand
and NIfTI with nibabel in the layout ITK itself writes (a 5D vector image, intent
``NIFTI_INTENT_VECTOR``, affine ``diag(-sx, -sy, sz)``: ITK's identity direction in
LPS coordinates). ``tests/core/test_itk_field.py`` checks the round trip through
SimpleITK: reading either file and resampling with ``sitk.DisplacementFieldTransform``
gives napari-discreg's own warp.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np

ITK_FIELD_EXTENSIONS: tuple[str, ...] = (".mha", ".nii", ".nii.gz")
"""Extensions written in ITK's displacement-field convention."""

CONVENTION = {
    "kind": "displacement field",
    "convention": (
        "backward map: warped(r, c) = moving(r + u[0, r, c], c + u[1, r, c]); "
        "array (2, H, W) or (N, 2, H, W), component 0 rows, 1 columns"
    ),
    "units": "pixels",
    "software": "napari-discreg",
}
"""What a saved ``.npy``/TIFF field holds (written into its metadata)."""

ITK_CONVENTION = (
    "napari-discreg displacement field; ITK DisplacementFieldTransform: "
    "x -> x + d(x), physical units, (x, y[, z]) components"
)

_MAX_HEADER = 4096


def _spacing(spacing, ndim: int) -> np.ndarray:
    """Pixel spacing in array order (row, col) or (slice, row, col); default 1."""
    if spacing is None:
        return np.ones(ndim)
    s = np.asarray(spacing, dtype=float).ravel()
    if s.shape != (ndim,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(
            f"spacing must be {ndim} positive finite numbers (array axis order), got {spacing!r}"
        )
    return s


def to_itk_vectors(field: np.ndarray, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """``field`` (2, H, W) or (N, 2, H, W) in pixels -> (ITK vector array, ITK spacing).

    The vector array is (H, W, 2) or (N, H, W, 3) float32 in physical units, components
    in ITK order (x, y[, z]); the spacing is in ITK order (x, y[, z]).
    """
    f = np.asarray(field, dtype=np.float64)
    if f.ndim == 3 and f.shape[0] == 2:
        s = _spacing(spacing, 2)  # (row, col)
        vec = np.stack([f[1] * s[1], f[0] * s[0]], axis=-1)
        return vec.astype(np.float32), s[::-1].copy()
    if f.ndim == 4 and f.shape[1] == 2:
        s = _spacing(spacing, 3)  # (slice, row, col)
        vec = np.stack([f[:, 1] * s[2], f[:, 0] * s[1], np.zeros_like(f[:, 0])], axis=-1)
        return vec.astype(np.float32), s[::-1].copy()
    raise ValueError(f"a displacement field has shape (2, H, W) or (N, 2, H, W), got {f.shape}")


def from_itk_vectors(vectors: np.ndarray, spacing_xyz) -> np.ndarray:
    """Inverse of :func:`to_itk_vectors`: an ITK vector array -> pixels (row, col)."""
    v = np.asarray(vectors, dtype=np.float64)
    s = np.asarray(spacing_xyz, dtype=float)
    if v.ndim == 3 and v.shape[-1] == 2 and s.shape == (2,):
        return np.stack([v[..., 1] / s[1], v[..., 0] / s[0]]).astype(np.float32)
    if v.ndim == 4 and v.shape[-1] == 3 and s.shape == (3,):
        if np.any(np.abs(v[..., 2]) > 1e-6 * max(1.0, float(np.abs(v).max()))):
            raise ValueError(
                "the 3D displacement field moves along z; napari-discreg fields are 2D per slice"
            )
        field = np.stack([v[..., 1] / s[1], v[..., 0] / s[0]], axis=1)
        return field.astype(np.float32)
    raise ValueError(
        f"expected an ITK vector image of 2D (H, W, 2) or a stack (N, H, W, 3), got {v.shape}"
    )


def _origin(origin, ndim: int) -> np.ndarray:
    """The physical position of pixel 0 in ITK order (x, y[, z]) from array order."""
    if origin is None:
        return np.zeros(ndim)
    o = np.asarray(origin, dtype=float).ravel()
    if o.size != ndim or not np.isfinite(o).all():
        raise ValueError(f"origin must be {ndim} finite numbers (array axis order), got {origin!r}")
    return o[::-1].copy()


def write_itk_field(path: str | os.PathLike, field, spacing=None, *, ext: str, origin=None) -> None:
    """Write ``field`` (pixels, (row, col)) to ``path`` as an ITK displacement field.

    ``ext`` chooses the format (``path`` may be a temporary name): ``.mha`` or
    ``.nii``/``.nii.gz``. ``spacing`` is the pixel size in array order (row, col), or
    (slice, row, col) for a stack; default 1. ``origin`` is the physical position of
    the first pixel in the same order (napari's ``translate``); default 0.
    """
    vec, sp = to_itk_vectors(field, spacing)
    org = _origin(origin, vec.ndim - 1)
    if ext == ".mha":
        _write_mha(Path(path), vec, sp, org)
    elif ext in (".nii", ".nii.gz"):
        _write_nifti(Path(path), vec, sp, org, compressed=ext == ".nii.gz")
    else:
        raise ValueError(f"ITK fields are written as {', '.join(ITK_FIELD_EXTENSIONS)}, not {ext}")


def _write_mha(path: Path, vec: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> None:
    ndim = vec.ndim - 1
    size = vec.shape[:-1][::-1]  # ITK order (x, y[, z])
    eye = " ".join("1" if i == j else "0" for i in range(ndim) for j in range(ndim))
    header = "\n".join(
        [
            "ObjectType = Image",
            f"NDims = {ndim}",
            "BinaryData = True",
            "BinaryDataByteOrderMSB = False",
            "CompressedData = False",
            f"TransformMatrix = {eye}",
            f"Offset = {' '.join(repr(float(v)) for v in origin)}",
            f"CenterOfRotation = {' '.join(['0'] * ndim)}",
            f"ElementSpacing = {' '.join(repr(float(v)) for v in spacing)}",
            f"DimSize = {' '.join(str(int(v)) for v in size)}",
            f"ElementNumberOfChannels = {vec.shape[-1]}",
            "ElementType = MET_FLOAT",
            f"Comment = {ITK_CONVENTION}",
            "ElementDataFile = LOCAL",
            "",
        ]
    )
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(np.ascontiguousarray(vec, dtype="<f4").tobytes())


def _write_nifti(
    path: Path, vec: np.ndarray, spacing: np.ndarray, origin: np.ndarray, *, compressed: bool
) -> None:
    import nibabel as nib

    # ITK's NIfTI layout: voxel axes (x, y, z, t, components), x fastest
    if vec.ndim == 3:  # (H, W, 2) -> (W, H, 1, 1, 2)
        data = np.transpose(vec, (1, 0, 2))[:, :, None, None, :]
        sx, sy, sz = float(spacing[0]), float(spacing[1]), 1.0
    else:  # (N, H, W, 3) -> (W, H, N, 1, 3)
        data = np.transpose(vec, (2, 1, 0, 3))[:, :, :, None, :]
        sx, sy, sz = (float(v) for v in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])  # ITK's identity direction, LPS -> RAS
    ox, oy = float(origin[0]), float(origin[1])
    oz = float(origin[2]) if origin.size > 2 else 0.0
    affine[:3, 3] = (-ox, -oy, oz)
    img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    hdr = img.header
    hdr.set_intent("vector", (), name="displacement")
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"napari-discreg field; ITK x->x+d(x)"
    raw = img.to_bytes()  # by ``compressed``, not by the (possibly temporary) file name
    with open(path, "wb") as fh:
        fh.write(gzip.compress(raw, compresslevel=6, mtime=0) if compressed else raw)


def read_itk_field(path: str | os.PathLike, ext: str) -> np.ndarray:
    """Read an ITK displacement field (``.mha`` as written here, or any NIfTI vector
    image in ITK's layout) back into pixels, (row, col): (2, H, W) or (N, 2, H, W)."""
    p = Path(path)
    if ext == ".mha":
        vec, spacing = _read_mha(p)
    else:
        vec, spacing = _read_nifti(p)
    return from_itk_vectors(vec, spacing)


def itk_field_geometry(
    path: str | os.PathLike, ext: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel spacing and origin (the first pixel's position) an ITK field file
    declares, in array order ((row, col) or (slice, row, col)), from its header alone."""
    p = Path(path)
    if ext == ".mha":
        fields, _ = _mha_header(p)
        try:
            ndim = int(fields["NDims"])
            spacing = [float(v) for v in fields.get("ElementSpacing", "").split()] or [1.0] * ndim
            origin = [float(v) for v in fields.get("Offset", "").split()] or [0.0] * ndim
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{p}: malformed MetaImage header ({exc})") from exc
        if len(spacing) != ndim or len(origin) != ndim:
            raise ValueError(f"{p}: ElementSpacing and Offset must have NDims = {ndim} values")
        return tuple(spacing[::-1]), tuple(origin[::-1])
    import nibabel as nib

    img: Any = nib.load(str(p))
    shape = img.header.get_data_shape()
    ndim = 3 if len(shape) == 5 and shape[4] == 3 else 2
    zooms = [float(v) for v in img.header.get_zooms()[:ndim]]
    a = img.affine
    origin = [-float(a[0, 3]), -float(a[1, 3]), float(a[2, 3])][:ndim]  # RAS -> ITK's LPS
    return tuple(zooms[::-1]), tuple(origin[::-1])


def is_itk_field(path: str | os.PathLike, ext: str) -> bool:
    """True when ``path`` declares an ITK displacement field in its header: a 2D image of
    2-vectors or a 3D image of 3-vectors (``.mha``), a 5D NIfTI vector image (``.nii``,
    ``.nii.gz``). Never raises: an unreadable file is not a field."""
    try:
        shape = itk_field_shape(path, ext)
    except Exception:  # noqa: BLE001 - any unreadable header: not ours to read
        return False
    if ext == ".mha":
        return len(shape) in (3, 4) and shape[-1] == len(shape) - 1
    return len(shape) == 5 and shape[3] == 1 and shape[4] in (2, 3)


def itk_field_shape(path: str | os.PathLike, ext: str) -> tuple[int, ...]:
    """The array shape (components included) an ITK field file declares, from its
    header alone (nothing decoded)."""
    p = Path(path)
    if ext == ".mha":
        fields, _ = _mha_header(p)
        try:
            size = [int(v) for v in fields["DimSize"].split()]
            comps = int(fields.get("ElementNumberOfChannels", "1"))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{p}: malformed MetaImage header ({exc})") from exc
        return (*size[::-1], comps)
    import nibabel as nib

    img: Any = nib.load(str(p))  # a Nifti1Image (nibabel types it as the base class)
    return tuple(int(v) for v in img.header.get_data_shape())


def _mha_header(p: Path) -> tuple[dict[str, str], int]:
    """The MetaImage header's fields and the offset of the data."""
    with open(p, "rb") as fh:
        head = fh.read(_MAX_HEADER)
    marker = head.find(b"ElementDataFile")
    end = head.find(b"\n", marker)
    if marker < 0 or end < 0:
        raise ValueError(f"{p}: not a MetaImage file with local data")
    fields = {}
    for line in head[:end].decode("ascii", "replace").splitlines():
        key, _, value = line.partition("=")
        fields[key.strip()] = value.strip()
    return fields, end + 1


def _read_mha(p: Path) -> tuple[np.ndarray, np.ndarray]:
    fields, offset = _mha_header(p)
    if fields.get("ElementDataFile") != "LOCAL" or fields.get("CompressedData", "False") != "False":
        raise ValueError(f"{p}: only uncompressed MetaImage files with LOCAL data are read")
    if fields.get("ElementType") not in ("MET_FLOAT", "MET_DOUBLE"):
        raise ValueError(f"{p}: a displacement field has float elements")
    try:
        size = [int(v) for v in fields["DimSize"].split()]
        comps = int(fields.get("ElementNumberOfChannels", "1"))
        spacing = np.array([float(v) for v in fields.get("ElementSpacing", "").split()] or [1.0])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{p}: malformed MetaImage header ({exc})") from exc
    if len(spacing) != len(size):
        spacing = np.ones(len(size))
    dtype = np.dtype("<f4" if fields["ElementType"] == "MET_FLOAT" else "<f8")
    if fields.get("BinaryDataByteOrderMSB", "False") == "True":
        dtype = dtype.newbyteorder(">")
    count = int(np.prod(size)) * comps
    expected = count * dtype.itemsize
    if os.path.getsize(p) - offset < expected:
        raise ValueError(f"{p}: the file is shorter than its header says")
    arr = np.fromfile(p, dtype=dtype, count=count, offset=offset)
    return arr.reshape(*size[::-1], comps), spacing


def _read_nifti(p: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img: Any = nib.load(str(p))
    shape = img.shape
    if len(shape) != 5 or shape[3] != 1 or shape[4] not in (2, 3):
        raise ValueError(f"{p}: not an ITK displacement field (5D vector image), shape {shape}")
    zooms = img.header.get_zooms()
    data = np.asarray(img.dataobj, dtype=np.float32)[:, :, :, 0, :]  # (x, y, z, c)
    if shape[4] == 2:
        if shape[2] != 1:
            raise ValueError(f"{p}: a 2-component field must be 2D, shape {shape}")
        return np.transpose(data[:, :, 0, :], (1, 0, 2)), np.array(zooms[:2], dtype=float)
    return np.transpose(data, (2, 1, 0, 3)), np.array(zooms[:3], dtype=float)


def itk_affine_text(matrix, *, fixed_spacing=(1.0, 1.0), moving_spacing=(1.0, 1.0)) -> str:
    """A pre-alignment (3 x 3, fixed pixel ``(r, c, 1)`` -> moving pixel) as an ITK
    transform file (``.tfm``, ``AffineTransform_double_2_2``).

    ITK's transforms map a fixed physical point to the moving physical point it samples
    (the same direction as the pixel map), in (x, y) = (column, row) order, origin 0 and
    identity direction as in :func:`write_itk_field`. SimpleITK's ``ReadTransform``,
    transformix and ANTs' ``antsApplyTransforms`` read it.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.shape not in ((3, 3), (2, 3)) or not np.all(np.isfinite(a)):
        raise ValueError(f"expected a finite (3, 3) pixel transform, got shape {a.shape}")
    sf = np.asarray(fixed_spacing, dtype=np.float64)
    sm = np.asarray(moving_spacing, dtype=np.float64)
    # physical (y, x) = pixel (r, c) * spacing; swap to ITK's (x, y)
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    to_fixed_px = np.diag([1 / sf[0], 1 / sf[1], 1.0])
    to_moving_phys = np.diag([sm[0], sm[1], 1.0])
    full = np.eye(3)
    full[:2] = a[:2]
    phys = swap @ to_moving_phys @ full @ to_fixed_px @ swap
    m, t = phys[:2, :2], phys[:2, 2]
    params = " ".join(repr(float(v)) for v in (*m.ravel(), *t))
    return (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        "Transform: AffineTransform_double_2_2\n"
        f"Parameters: {params}\n"
        "FixedParameters: 0 0\n"
    )
