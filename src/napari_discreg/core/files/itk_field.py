"""Displacement fields as ITK displacement-field images (``.mha``, ``.nii``, ``.nii.gz``).

napari-discreg's own convention (:mod:`napari_discreg.core.registration.warp`) is a ``(2, H, W)``
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

Reading goes the other way for any ITK field, geometry included, as ITK reads it: the
pixel ``i`` (ITK order) lies at ``x = origin + D @ (spacing * i)`` with ``D`` the
direction (MetaImage ``TransformMatrix``/``Rotation``/``Orientation``, stored column by
column; NIfTI's sform or qform, chosen the way ITK's ``NiftiImageIO`` chooses, RAS turned
into LPS), so a physical vector ``d`` moves the pixel index by ``(D diag(spacing))^-1 d``.
That is exact for flips, axis permutations and oblique (even non-orthogonal) directions
alike: the field comes back in pixels of its own grid, and :func:`itk_geometry` says
where that grid lies (napari's ``scale``, ``translate`` and ``rotate``). A negative
spacing counts as a flip of the direction (ITK's reader does the same); a zero, NaN or
infinite MetaImage spacing, a singular direction or a non-orthonormal NIfTI transform
is refused (SimpleITK refuses those files too).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any, NamedTuple

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

_MAX_HEADER = 1 << 20
"""How far into a MetaImage file its header may reach (MetaIO has no limit of its own)."""


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


def from_itk_vectors(vectors: np.ndarray, spacing_xyz, direction_xyz=None) -> np.ndarray:
    """Inverse of :func:`to_itk_vectors`: an ITK vector array -> pixels (row, col).

    ``spacing_xyz`` and ``direction_xyz`` (the ITK direction matrix, columns the index
    axes; identity if omitted) give the grid: a physical vector ``d`` moves the index by
    ``(D diag(spacing))^-1 d``. A 3D field must not move across slices.
    """
    v = np.asarray(vectors, dtype=np.float64)
    s = np.asarray(spacing_xyz, dtype=float).ravel()
    n = v.shape[-1] if v.ndim in (3, 4) else 0
    if not ((v.ndim == 3 and n == 2) or (v.ndim == 4 and n == 3)) or s.shape != (n,):
        raise ValueError(
            f"expected an ITK vector image of 2D (H, W, 2) or a stack (N, H, W, 3) with one "
            f"spacing per axis, got {v.shape} and spacing {list(s)}"
        )
    d = np.eye(n) if direction_xyz is None else np.asarray(direction_xyz, dtype=float)
    inverse = _index_map(s, d)
    delta = v @ inverse.T  # index steps, ITK order (x, y[, z])
    if n == 3:
        if np.any(np.abs(delta[..., 2]) > 1e-6 * max(1.0, float(np.abs(delta).max()))):
            raise ValueError(
                "the 3D displacement field moves along z; napari-discreg fields are 2D per slice"
            )
        return np.stack([delta[..., 1], delta[..., 0]], axis=1).astype(np.float32)
    return np.stack([delta[..., 1], delta[..., 0]]).astype(np.float32)


def _index_map(spacing_xyz: np.ndarray, direction_xyz: np.ndarray) -> np.ndarray:
    """``(D diag(spacing))^-1``: physical vector -> index step; ValueError if there is none."""
    n = spacing_xyz.size
    if direction_xyz.shape != (n, n):
        raise ValueError(f"the direction must be a {n} x {n} matrix, got {direction_xyz.shape}")
    bad = [float(v) for v in spacing_xyz if not math.isfinite(v) or v == 0]
    if bad:
        raise ValueError(
            f"the spacing {[float(v) for v in spacing_xyz]} has a zero, NaN or infinite value "
            "(ITK refuses it too)"
        )
    if not np.isfinite(direction_xyz).all():
        raise ValueError(f"the direction matrix {direction_xyz.tolist()} is not finite")
    m = direction_xyz * spacing_xyz[None, :]
    if np.linalg.cond(direction_xyz) > 1e8:
        raise ValueError(
            f"the direction matrix {direction_xyz.tolist()} is singular: the field's grid "
            "has no physical placement"
        )
    return np.linalg.inv(m)


class FieldGeometry(NamedTuple):
    """Where an ITK field's pixel grid lies, in array order ((row, col) or (slice, row,
    col)): the pixel at array index ``i`` is at ``origin + direction @ (spacing * i)``
    (ITK's LPS world with the axes reversed: napari's ``translate``, ``rotate`` and
    ``scale``). ``spacing`` is positive (a negative one is a flip in ``direction``)."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[tuple[float, ...], ...]

    @property
    def axis_aligned(self) -> bool:
        """True when ``direction`` is the identity (``scale`` and ``translate`` suffice)."""
        return bool(np.allclose(self.direction, np.eye(len(self.spacing)), atol=1e-9))


def _array_geometry(spacing_xyz, origin_xyz, direction_xyz) -> FieldGeometry:
    """ITK order (signed spacing) -> :class:`FieldGeometry` (array order, spacing > 0)."""
    s = np.asarray(spacing_xyz, dtype=float)
    d = np.asarray(direction_xyz, dtype=float) * np.where(s < 0, -1.0, 1.0)[None, :]
    d_arr = d[::-1, ::-1]
    return FieldGeometry(
        tuple(float(v) for v in np.abs(s)[::-1]),
        tuple(float(v) for v in np.asarray(origin_xyz, dtype=float)[::-1]),
        tuple(tuple(float(v) + 0.0 for v in row) for row in d_arr),
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
    """Read an ITK displacement field (``.mha``, or a NIfTI vector image in ITK's layout)
    back into pixels of its own grid, (row, col): (2, H, W) or (N, 2, H, W), honouring
    its spacing and direction as ITK does (module docstring)."""
    return read_itk_field_and_geometry(path, ext)[0]


def read_itk_field_and_geometry(
    path: str | os.PathLike, ext: str
) -> tuple[np.ndarray, FieldGeometry]:
    """:func:`read_itk_field` and :func:`itk_geometry` from one reading of the file."""
    p = Path(path)
    if ext == ".mha":
        vec, (spacing, origin, direction) = _read_mha(p)
    else:
        vec, (spacing, origin, direction) = _read_nifti(p)
    try:
        field = from_itk_vectors(vec, spacing, direction)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from exc
    return field, _array_geometry(spacing, origin, direction)


def itk_geometry(path: str | os.PathLike, ext: str) -> FieldGeometry:
    """The grid an ITK field file declares (spacing, origin, direction; array order),
    from its header alone, read as ITK reads it. ValueError for a grid ITK refuses."""
    p = Path(path)
    if ext == ".mha":
        fields, _ = _mha_header(p)
        spacing, origin, direction = _mha_grid(p, fields)
    else:
        import nibabel as nib

        img: Any = nib.load(str(p))
        ndim = 3 if len(img.shape) == 5 and img.shape[4] == 3 else 2
        spacing, origin, direction = _nifti_grid(p, _raw_nifti_header(p), ndim)
    try:
        _index_map(spacing, direction)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from exc
    return _array_geometry(spacing, origin, direction)


def itk_field_geometry(
    path: str | os.PathLike, ext: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel spacing and origin (the first pixel's position) an ITK field file
    declares, in array order ((row, col) or (slice, row, col)), from its header alone
    (:func:`itk_geometry` also gives the direction)."""
    g = itk_geometry(path, ext)
    return g.spacing, g.origin


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
    """The MetaImage header's fields (keys as written: MetaIO's are case-sensitive) and
    the offset of the data, which follows the ``ElementDataFile`` line."""
    head = b""
    with open(p, "rb") as fh:
        while len(head) < _MAX_HEADER:
            chunk = fh.read(65536)
            if not chunk:
                break
            head += chunk
            fields: dict[str, str] = {}
            pos = 0
            while (end := head.find(b"\n", pos)) >= 0:
                key, _, value = head[pos:end].decode("latin-1").partition("=")
                fields.setdefault(key.strip(), value.strip())
                pos = end + 1
                if key.strip() == "ElementDataFile":
                    return fields, pos
    raise ValueError(f"{p}: not a MetaImage file with local data (no ElementDataFile line)")


def _mha_flag(fields: dict[str, str], *keys: str) -> bool:
    """A MetaIO boolean: true when the value starts with T, t or 1 (as MetaIO reads it)."""
    for key in keys:
        if key in fields:
            return fields[key][:1] in ("T", "t", "1")
    return False


def _mha_numbers(p: Path, fields: dict[str, str], keys: tuple[str, ...], count: int, default):
    """The first of ``keys`` present as ``count`` numbers (MetaIO refuses another count)."""
    for key in keys:
        if key in fields:
            try:
                values = [float(v) for v in fields[key].split()]
            except ValueError as exc:
                raise ValueError(f"{p}: {key} is not a list of numbers ({exc})") from exc
            if len(values) != count:
                raise ValueError(
                    f"{p}: {key} has {len(values)} value(s) where NDims asks for {count}"
                )
            return np.array(values)
    return np.asarray(default, dtype=float)


def _mha_ndims(p: Path, fields: dict[str, str]) -> int:
    try:
        ndim = int(fields["NDims"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{p}: malformed MetaImage header (NDims: {exc})") from exc
    if not 1 <= ndim <= 3:
        raise ValueError(f"{p}: NDims = {ndim}; a displacement field is 2D or 3D")
    return ndim


def _mha_grid(p: Path, fields: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, origin, direction) in ITK order as MetaIO and ITK read them: spacing from
    ``ElementSpacing`` else ``ElementSize`` else 1; origin from ``Offset``/``Position``/
    ``Origin``; direction from ``TransformMatrix``/``Rotation``/``Orientation`` (column
    by column: the first NDims values are the x index axis)."""
    n = _mha_ndims(p, fields)
    spacing = _mha_numbers(p, fields, ("ElementSpacing", "ElementSize"), n, np.ones(n))
    origin = _mha_numbers(p, fields, ("Offset", "Position", "Origin"), n, np.zeros(n))
    matrix = _mha_numbers(
        p, fields, ("TransformMatrix", "Rotation", "Orientation"), n * n, np.eye(n).ravel()
    )
    if not np.isfinite(origin).all():
        raise ValueError(f"{p}: the origin {origin.tolist()} is not finite")
    return spacing, origin, matrix.reshape(n, n).T


def _read_mha(p: Path) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    fields, offset = _mha_header(p)
    if fields.get("ElementDataFile") != "LOCAL":
        raise ValueError(f"{p}: only MetaImage files with LOCAL data are read")
    if "BinaryData" in fields and not _mha_flag(fields, "BinaryData"):
        raise ValueError(f"{p}: only binary MetaImage data are read (BinaryData = False)")
    if fields.get("ElementType") not in ("MET_FLOAT", "MET_DOUBLE"):
        raise ValueError(f"{p}: a displacement field has float elements")
    ndim = _mha_ndims(p, fields)
    try:
        size = [int(v) for v in fields["DimSize"].split()]
        comps = int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{p}: malformed MetaImage header ({exc})") from exc
    if len(size) != ndim or min(size) < 1 or comps < 1:
        raise ValueError(
            f"{p}: DimSize {size} must be NDims = {ndim} positive sizes (an empty field is "
            "not a field)"
        )
    grid = _mha_grid(p, fields)
    dtype = np.dtype("<f4" if fields["ElementType"] == "MET_FLOAT" else "<f8")
    if _mha_flag(fields, "BinaryDataByteOrderMSB", "ElementByteOrderMSB"):
        dtype = dtype.newbyteorder(">")
    count = int(np.prod(size)) * comps
    expected = count * dtype.itemsize
    if _mha_flag(fields, "CompressedData"):
        with open(p, "rb") as fh:
            fh.seek(offset)
            raw = zlib.decompressobj().decompress(fh.read(), expected)
        if len(raw) < expected:
            raise ValueError(f"{p}: the compressed data are shorter than the header says")
        arr = np.frombuffer(raw, dtype=dtype, count=count)
    else:
        if os.path.getsize(p) - offset < expected:
            raise ValueError(f"{p}: the file is shorter than its header says")
        arr = np.fromfile(p, dtype=dtype, count=count, offset=offset)
    return arr.reshape(*size[::-1], comps), grid


def _nifti_grid(p: Path, hdr: Any, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, origin, direction) in ITK order as ITK's NiftiImageIO reads them.

    Spacing: pixdim (a zero or non-finite one counts as 1; a negative one flips the
    axis). Transform: none when neither form is coded (origin 0, identity); else the
    sform when it is coded and orthonormal and either the qform is not coded, the sform
    is SCANNER_ANAT, or both describe the same grid; else the coded qform; else refused.
    Direction: the transform's normalized columns with x and y negated (RAS -> LPS),
    in 2D only their first two components.
    """
    pixdim = np.asarray(hdr["pixdim"], dtype=float)
    spacing = pixdim[1 : ndim + 1].copy()
    spacing[~np.isfinite(spacing) | (spacing == 0)] = 1.0
    scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
    if scode == 0 and qcode == 0:
        return spacing, np.zeros(ndim), np.eye(ndim)
    sform = np.asarray(hdr.get_sform(), dtype=float) if scode else None
    qform = _qform(hdr) if qcode else None
    if (
        sform is not None
        and _orthonormal(sform)
        and (qform is None or scode == 1 or _same_grid(sform, qform))
    ):
        mat = sform
    elif qform is not None:
        mat = qform
    else:
        raise ValueError(
            f"{p}: the NIfTI sform is not orthonormal and there is no qform "
            "(ITK refuses such a file: no orthonormal direction)"
        )
    lps = mat[:3].copy()
    lps[:2] *= -1.0
    origin = lps[:ndim, 3].copy()
    direction = lps[:ndim, :ndim].copy()
    norms = np.linalg.norm(direction, axis=0)
    direction[:, norms > 0] /= norms[norms > 0]
    return spacing, origin, direction


def _qform(hdr: Any) -> np.ndarray:
    """The qform as niftilib computes it (nifti_quatern_to_mat44): voxel sizes |pixdim|."""
    b, c, d = (float(hdr[k]) for k in ("quatern_b", "quatern_c", "quatern_d"))
    a = 1.0 - (b * b + c * c + d * d)
    if a < 1e-7:  # a 180 degree rotation: normalize (b, c, d)
        norm = 1.0 / math.sqrt(b * b + c * c + d * d)
        a, b, c, d = 0.0, b * norm, c * norm, d * norm
    else:
        a = math.sqrt(a)
    r = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    zooms = np.abs(np.asarray(hdr["pixdim"][1:4], dtype=float))
    zooms[~np.isfinite(zooms) | (zooms == 0)] = 1.0
    if float(hdr["pixdim"][0]) < 0:
        zooms[2] *= -1.0
    r = r * zooms[None, :]
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = [float(hdr[k]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")]
    return out


def _orthonormal(mat: np.ndarray) -> bool:
    """ITK's test of an sform: invertible, and orthonormal once its columns are normalized."""
    top = mat[:3, :3]
    norms = np.linalg.norm(top, axis=0)
    if not np.isfinite(mat).all() or np.any(norms == 0):
        return False
    r = top / norms
    return bool(np.allclose(r @ r.T, np.eye(3), atol=1e-4))


def _same_grid(sform: np.ndarray, qform: np.ndarray) -> bool:
    """ITK's "sform and qform are very similar": the same left singular vectors, singular
    values (the qform scaled by pixdim) and offsets, in single precision."""
    us, ws, _ = np.linalg.svd(sform[:3, :3].astype(np.float32))
    uq, wq, _ = np.linalg.svd(qform[:3, :3].astype(np.float32))
    return bool(
        np.allclose(us @ np.linalg.inv(uq), np.eye(3), rtol=0, atol=1e-4)
        and np.allclose(ws, wq, rtol=0, atol=1e-4)
        and np.allclose(sform[:3, 3], qform[:3, 3], rtol=0, atol=1e-4)
    )


def _read_nifti(p: Path) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    import nibabel as nib

    img: Any = nib.load(str(p))
    shape = img.shape
    if len(shape) != 5 or shape[3] != 1 or shape[4] not in (2, 3):
        raise ValueError(f"{p}: not an ITK displacement field (5D vector image), shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"{p}: an empty field (shape {shape})")
    data = np.asarray(img.dataobj, dtype=np.float32)[:, :, :, 0, :]  # (x, y, z, c)
    if shape[4] == 2:
        if shape[2] != 1:
            raise ValueError(f"{p}: a 2-component field must be 2D, shape {shape}")
        return np.transpose(data[:, :, 0, :], (1, 0, 2)), _nifti_grid(p, _raw_nifti_header(p), 2)
    return np.transpose(data, (2, 1, 0, 3)), _nifti_grid(p, _raw_nifti_header(p), 3)


def _raw_nifti_header(p: Path) -> Any:
    """The NIfTI header as stored: ``nib.load`` "fixes" a negative pixdim to its absolute
    value, while ITK reads the sign (a flip of that axis)."""
    import nibabel as nib

    opener = gzip.open if p.name.lower().endswith(".gz") else open
    with opener(p, "rb") as fh:
        return nib.Nifti1Header.from_fileobj(fh, check=False)


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
