"""ITK displacement-field files are read as ITK reads them: spacing, direction and origin.

Each case writes a tiny field file (with SimpleITK, nibabel or raw bytes), reads it with
SimpleITK and with napari-discreg, and compares the displacement at one pixel, in pixels
of the field's own grid: SimpleITK's physical vector ``d`` at index ``i`` moves the point
``x(i)`` to ``x(i) + d``, which is the continuous index ``i + step``; ``load_field`` must
give that ``step`` (row, col). Files SimpleITK refuses must be refused with a clear
message. ``FIELD_CASES`` also fills the robustness table (tests/core/test_robustness.py).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from napari_discreg.core.files.imagefiles import load_field, read_field, save_field
from napari_discreg.core.files.itk_field import itk_field_geometry, itk_geometry

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")

H, W = 3, 4
PIXEL = (1, 2)  # (row, col) where the two readers are compared
VEC = np.zeros((H, W, 2), np.float32)
VEC[..., 0], VEC[..., 1] = 1.0, 2.0  # physical (x, y) = (1, 2) everywhere
VEC[PIXEL[0], PIXEL[1]] = (1.0, 2.0)


def _sitk_image(direction=(1.0, 0.0, 0.0, 1.0), spacing=(1.0, 1.0), origin=(0.0, 0.0)):
    img = sitk.GetImageFromArray(VEC, isVector=True)
    img.SetDirection(direction)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _mha(path: Path, lines: list[str], data: np.ndarray | None = None, msb=False) -> Path:
    """A MetaImage field written byte by byte (``lines``: the geometry and byte order)."""
    header = [
        "ObjectType = Image",
        "NDims = 2",
        "BinaryData = True",
        "CompressedData = False",
        *lines,
        f"DimSize = {W} {H}",
        "ElementNumberOfChannels = 2",
        "ElementType = MET_FLOAT",
        "ElementDataFile = LOCAL",
    ]
    values = VEC if data is None else data
    path.write_bytes(
        ("\n".join(header) + "\n").encode() + values.astype(">f4" if msb else "<f4").tobytes()
    )
    return path


def _nifti(path: Path, sform=None, scode=0, qform=None, qcode=0, pixdim=None) -> Path:
    """A NIfTI vector image in ITK's layout with the header exactly as given (``nib.save``
    would rewrite pixdim from the affine)."""
    data = np.transpose(VEC, (1, 0, 2))[:, :, None, None, :]  # (x, y, z, t, c)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_intent("vector", (), name="displacement")
    if sform is not None:
        hdr.set_sform(sform, code=scode)
    if qform is not None:
        hdr.set_qform(qform, code=qcode)
    hdr["sform_code"], hdr["qform_code"] = scode, qcode
    for i, v in enumerate(pixdim or ()):
        hdr["pixdim"][i + 1] = v
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + data.astype("<f4").tobytes(order="F")
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _write_sitk(path: Path, img) -> Path:
    sitk.WriteImage(img, str(path))
    return path


def _identity_ras(path: Path) -> Path:
    """nibabel's image with ``np.eye(4)``: RAS identity, LPS diag(-1, -1)."""
    img = nib.Nifti1Image(np.transpose(VEC, (1, 0, 2))[:, :, None, None, :], np.eye(4))
    img.header.set_intent("vector", (), name="displacement")
    nib.save(img, str(path))
    return path


LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK's identity direction as a NIfTI affine
ROT = np.array([[0.8, -0.6, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1.0]])

FIELD_CASES = {
    # name: (file name, how it is written)
    ".mha, flipped direction (TransformMatrix -1 0 0 1)": (
        "flip.mha",
        lambda p: _write_sitk(p, _sitk_image(direction=(-1.0, 0.0, 0.0, 1.0))),
    ),
    ".mha, direction rotated by 90 degrees": (
        "rot90.mha",
        lambda p: _write_sitk(p, _sitk_image(direction=(0.0, -1.0, 1.0, 0.0))),
    ),
    ".mha, oblique direction (36.9 degrees), spacing (0.5, 2), origin (5, 7)": (
        "oblique.mha",
        lambda p: _write_sitk(
            p, _sitk_image(direction=(0.8, -0.6, 0.6, 0.8), spacing=(0.5, 2.0), origin=(5, 7))
        ),
    ),
    ".nii, identity RAS affine (nibabel, np.eye(4))": ("ras.nii", _identity_ras),
    ".nii.gz, negative pixdim (-2, -2)": (
        "negpix.nii.gz",
        lambda p: _nifti(p, sform=LPS, scode=2, pixdim=(-2.0, -2.0, 1.0)),
    ),
    ".nii, oblique qform, pixdim (0.5, 2)": (
        "oblique_q.nii",
        lambda p: _nifti(p, qform=ROT @ np.diag([0.5, 2.0, 1.0, 1.0]), qcode=1),
    ),
    ".mha, ElementSize 0.5 and no ElementSpacing": (
        "elementsize.mha",
        lambda p: _mha(p, ["ElementSize = 0.5 0.5"]),
    ),
    ".mha, lowercase `BinaryDataByteOrderMSB = true`": (
        "msb.mha",
        lambda p: _mha(p, ["BinaryDataByteOrderMSB = true"], msb=True),
    ),
    ".mha, header over 4 KB (80 extra fields)": (
        "long_header.mha",
        lambda p: _mha(p, [f"Extra{i} = {'y' * 60}" for i in range(80)]),
    ),
    ".mha, one ElementSpacing value for a 2D field": (
        "one_spacing.mha",
        lambda p: _mha(p, ["ElementSpacing = 0.5"]),
    ),
    ".mha, infinite spacing": ("inf_spacing.mha", lambda p: _mha(p, ["ElementSpacing = inf 1"])),
    ".mha, zero spacing": ("zero_spacing.mha", lambda p: _mha(p, ["ElementSpacing = 0 1"])),
    ".mha, NaN spacing": ("nan_spacing.mha", lambda p: _mha(p, ["ElementSpacing = nan 1"])),
    ".mha, singular direction (TransformMatrix 1 0 1 0)": (
        "singular.mha",
        lambda p: _mha(p, ["TransformMatrix = 1 0 1 0"]),
    ),
}


def itk_step(path: Path, pixel=PIXEL) -> np.ndarray | str:
    """SimpleITK's displacement at ``pixel`` (row, col) in pixels, or its error."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        return f"refused: {str(exc).strip().splitlines()[-1]}"
    idx = (pixel[1], pixel[0])
    x = np.array(img.TransformIndexToPhysicalPoint(idx))
    moved = x + np.array(img.GetPixel(*idx))
    cont = np.array(img.TransformPhysicalPointToContinuousIndex(tuple(moved)))
    return (cont - np.array(idx))[::-1]


def make_case(tmp_path: Path, name: str) -> Path:
    file_name, build = FIELD_CASES[name]
    return build(tmp_path / file_name)


@pytest.mark.parametrize("name", list(FIELD_CASES))
def test_field_files_read_as_simpleitk_reads_them(tmp_path, name):
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    path = make_case(tmp_path, name)
    theirs = itk_step(path)
    if isinstance(theirs, str):  # SimpleITK refuses the file: so do we, naming why
        with pytest.raises(ValueError, match=r"spacing|ElementSpacing|direction") as err:
            load_field(path)
        assert path.name in str(err.value) and "NaN or infinite values" not in str(err.value)
        return
    field = load_field(path)
    np.testing.assert_allclose(field[:, PIXEL[0], PIXEL[1]], theirs, atol=1e-5)
    np.testing.assert_allclose(read_field(path)[:, PIXEL[0], PIXEL[1]], theirs, atol=1e-5)
    # and the grid lies where ITK puts it: world(i) = origin + direction @ (spacing * i)
    img = sitk.ReadImage(str(path))
    geo = itk_geometry(path, ".nii.gz" if path.name.endswith(".gz") else path.suffix)
    for r, c in [(0, 0), PIXEL, (H - 1, W - 1)]:
        world = np.add(geo.origin, np.asarray(geo.direction) @ (np.array(geo.spacing) * (r, c)))
        np.testing.assert_allclose(world, img.TransformIndexToPhysicalPoint((c, r))[::-1])


def test_the_attacks_values(tmp_path):
    """The values issue 26 quoted (SimpleITK's / ours before the fix), now ours."""
    expected = {
        ".mha, flipped direction (TransformMatrix -1 0 0 1)": (2.0, -1.0),
        ".mha, direction rotated by 90 degrees": (-1.0, 2.0),
        ".nii, identity RAS affine (nibabel, np.eye(4))": (-2.0, -1.0),
        ".nii.gz, negative pixdim (-2, -2)": (-1.0, -0.5),
        ".mha, ElementSize 0.5 and no ElementSpacing": (4.0, 2.0),
        ".mha, lowercase `BinaryDataByteOrderMSB = true`": (2.0, 1.0),
    }
    for name, step in expected.items():
        path = make_case(tmp_path, name)
        np.testing.assert_allclose(load_field(path)[:, PIXEL[0], PIXEL[1]], step, err_msg=name)


@pytest.mark.parametrize(
    "key", ["Offset", "Position", "Origin"], ids=["Offset", "Position", "Origin"]
)
def test_the_origin_comes_back_under_each_metaio_name(tmp_path, key):
    path = _mha(tmp_path / "o.mha", [f"{key} = 10 -20"])
    assert sitk.ReadImage(str(path)).GetOrigin() == (10.0, -20.0)
    spacing, origin = itk_field_geometry(path, ".mha")
    assert origin == (-20.0, 10.0) and spacing == (1.0, 1.0)  # array order (row, col)


def test_an_oblique_field_warps_like_simpleitk(tmp_path):
    """Beyond one pixel: resampling with SimpleITK's DisplacementFieldTransform on the
    field's own (oblique, anisotropic) grid equals napari-discreg's warp of the field."""
    from napari_discreg.core.registration.warp import warp_numpy

    h, w = 32, 36
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    vec = np.stack([1.5 * np.sin(rr / 6.0), -1.2 * np.cos(cc / 5.0)], -1).astype(np.float32)
    field_img = sitk.GetImageFromArray(vec, isVector=True)
    geometry = {"direction": (0.8, -0.6, 0.6, 0.8), "spacing": (0.7, 1.3), "origin": (3.0, -2.0)}
    for key, value in geometry.items():
        getattr(field_img, "Set" + key.capitalize())(value)
    path = tmp_path / "oblique.mha"
    sitk.WriteImage(field_img, str(path))
    moving = (np.sin(rr / 4.0) * np.cos(cc / 3.0)).astype(np.float64)
    moving_img = sitk.GetImageFromArray(moving)
    moving_img.CopyInformation(field_img)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field_img, sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving_img, moving_img, tx, sitk.sitkLinear))
    ours = warp_numpy(moving.astype(np.float32), load_field(path), order=1)
    inner = (slice(5, -5), slice(5, -5))
    np.testing.assert_allclose(ours[inner], theirs[inner], atol=1e-4)


def test_a_zero_dimsize_is_refused(tmp_path):
    path = tmp_path / "empty.mha"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 2\nBinaryData = True\nDimSize = 0 3\n"
        b"ElementNumberOfChannels = 2\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    with pytest.raises(ValueError, match="DimSize"):
        load_field(path)


def test_read_field_refuses_infinite_values(tmp_path):
    field = np.zeros((2, 4, 5), np.float32)
    field[0, 1, 1] = np.inf
    np.save(tmp_path / "inf.npy", field)
    with pytest.raises(ValueError, match="NaN or infinite"):
        read_field(tmp_path / "inf.npy")


@pytest.mark.parametrize("name", ["nan.mha", "nan.npy", "nan.tif", "nan_stack.nii.gz"])
def test_save_field_refuses_nan_fields_at_save_time(tmp_path, name):
    field = np.zeros((3, 2, 4, 5) if "stack" in name else (2, 4, 5), np.float32)
    field[..., 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values"):
        save_field(tmp_path / name, field)
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_3d_stack_with_a_direction_reads_per_slice(tmp_path):
    """A 3D field on a flipped grid: the in-plane steps come back, none across slices."""
    vec = np.zeros((2, H, W, 3), np.float32)
    vec[..., 0], vec[..., 1] = 1.0, 2.0
    img = sitk.GetImageFromArray(vec, isVector=True)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0))
    img.SetSpacing((0.5, 1.0, 3.0))
    sitk.WriteImage(img, str(tmp_path / "stack.mha"))
    stack = load_field(tmp_path / "stack.mha")
    assert stack.shape == (2, 2, H, W)
    np.testing.assert_allclose(stack[:, 0], -2.0)  # rows: y flipped
    np.testing.assert_allclose(stack[:, 1], 2.0)  # cols: 1 / 0.5
