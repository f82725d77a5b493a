"""Displacement fields for ITK: the files SimpleITK reads warp exactly like napari-discreg."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_discreg.core.files.imagefiles import load_field, read_field, save_field, write_field
from napari_discreg.core.files.itk_field import from_itk_vectors, to_itk_vectors
from napari_discreg.core.registration.warp import warp_numpy

sitk = pytest.importorskip("SimpleITK")


def _smooth_field(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(1.0, 2.5, 2)
    return np.stack(
        [a * np.sin(2 * np.pi * cc / w + 0.3), b * np.cos(2 * np.pi * rr / h - 0.2)]
    ).astype(np.float32)


def _image(h: int, w: int) -> np.ndarray:
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    return (np.sin(rr / 5.0) * np.cos(cc / 7.0) + 0.02 * rr).astype(np.float32)


def _sitk_warp(moving: np.ndarray, field_image, spacing_rc, origin_rc=(0.0, 0.0)) -> np.ndarray:
    """Resample ``moving`` with SimpleITK's DisplacementFieldTransform (linear)."""
    img = sitk.GetImageFromArray(moving.astype(np.float64))
    img.SetSpacing((float(spacing_rc[1]), float(spacing_rc[0])))
    img.SetOrigin((float(origin_rc[1]), float(origin_rc[0])))
    disp = sitk.Cast(field_image, sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(disp)
    out = sitk.Resample(img, img, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    return sitk.GetArrayFromImage(out)


@pytest.mark.parametrize("name", ["field.mha", "field.nii.gz", "field.nii"])
@pytest.mark.parametrize(("spacing", "origin"), [((1.0, 1.0), None), ((0.5, 2.0), (5.0, -3.25))])
def test_itk_field_round_trip_through_simpleitk(tmp_path, name, spacing, origin):
    """SimpleITK reads the file as a vector image with the pixel grid it should have
    (spacing and origin: napari's scale and translate), and its
    DisplacementFieldTransform warps the moving image like ``warp_numpy`` (away from the
    border, where the two pad differently)."""
    h, w = 40, 48
    field, moving = _smooth_field(h, w), _image(h, w)
    path = write_field(tmp_path / name, field, spacing=spacing, origin=origin)
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (w, h)
    assert image.GetNumberOfComponentsPerPixel() == 2
    np.testing.assert_allclose(image.GetSpacing(), (spacing[1], spacing[0]))
    origin_rc = origin or (0.0, 0.0)
    np.testing.assert_allclose(image.GetOrigin(), (origin_rc[1], origin_rc[0]), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), (1.0, 0.0, 0.0, 1.0), atol=1e-9)
    vectors = sitk.GetArrayFromImage(image)  # (H, W, 2), ITK (x, y), physical units
    np.testing.assert_allclose(vectors[..., 0], field[1] * spacing[1], atol=1e-5)
    np.testing.assert_allclose(vectors[..., 1], field[0] * spacing[0], atol=1e-5)
    ours = warp_numpy(moving, field, order=1)
    theirs = _sitk_warp(moving, image, spacing, origin_rc)
    inner = (slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(theirs[inner], ours[inner], atol=1e-4)
    # and napari-discreg reads its own file back in pixels
    np.testing.assert_allclose(read_field(path), field, atol=1e-5)


def test_a_field_simpleitk_wrote_reads_back_in_pixels(tmp_path):
    field = _smooth_field(24, 30, seed=3)
    vec, sp = to_itk_vectors(field, (0.7, 1.3))
    image = sitk.GetImageFromArray(vec, isVector=True)
    image.SetSpacing(tuple(float(v) for v in sp))
    for name in ("itk.nii.gz", "itk.mha"):
        sitk.WriteImage(image, str(tmp_path / name))
        np.testing.assert_allclose(load_field(tmp_path / name), field, atol=1e-5)


def test_a_field_stack_is_a_3d_itk_field_over_the_volume(tmp_path):
    stack = np.stack([_smooth_field(20, 22, seed=k) for k in range(3)])
    path = save_field(
        tmp_path / "stack.nii.gz", stack, spacing=(3.0, 0.5, 0.5), origin=(9.0, 1.0, 2.0)
    )
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (22, 20, 3) and image.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.5, 3.0))
    np.testing.assert_allclose(image.GetOrigin(), (2.0, 1.0, 9.0), atol=1e-9)
    vec = sitk.GetArrayFromImage(image)
    np.testing.assert_allclose(vec[..., 2], 0.0)
    np.testing.assert_allclose(vec[1, ..., 0], stack[1, 1] * 0.5, atol=1e-5)
    np.testing.assert_allclose(load_field(path), stack, atol=1e-5)


def test_saved_fields_say_their_convention_and_units(tmp_path):
    field = _smooth_field(16, 16)
    import nibabel as nib
    import tifffile

    tif = write_field(tmp_path / "f.tif", field)
    with tifffile.TiffFile(tif) as t:
        meta = json.loads(t.pages[0].description)
    assert meta["units"] == "pixels" and "warped(r, c) = moving(r + u[0" in meta["convention"]
    np.testing.assert_array_equal(read_field(tif), field)
    nii = nib.load(str(write_field(tmp_path / "f.nii.gz", field)))
    assert nii.header.get_intent()[0] == "vector"
    assert b"x->x+d(x)" in nii.header["descrip"].tobytes()
    assert nii.header.get_xyzt_units()[0] == "mm"
    mha = write_field(tmp_path / "f.mha", field).read_bytes()[:600]
    assert b"DisplacementFieldTransform" in mha and b"ElementNumberOfChannels = 2" in mha


def test_conversion_checks():
    field = _smooth_field(8, 9)
    vec, sp = to_itk_vectors(field, (2.0, 3.0))
    np.testing.assert_allclose(from_itk_vectors(vec, sp), field, atol=1e-6)
    with pytest.raises(ValueError, match="spacing must be 2 positive"):
        to_itk_vectors(field, (0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        to_itk_vectors(field[0], None)
    moving_z = np.zeros((2, 4, 5, 3), np.float32)
    moving_z[..., 2] = 1.0
    with pytest.raises(ValueError, match="moves along z"):
        from_itk_vectors(moving_z, (1.0, 1.0, 1.0))


def test_a_truncated_mha_is_a_clear_error(tmp_path):
    path = write_field(tmp_path / "f.mha", _smooth_field(16, 16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="shorter than its header"):
        read_field(path)


@pytest.mark.parametrize("name", ["huge.npy", "huge.mha", "huge.tif"])
def test_a_field_file_declaring_a_huge_array_is_refused_before_decoding(
    tmp_path, name, monkeypatch
):
    """The voxel limit of the image readers holds for field files too: the header is
    checked before the data are read."""
    monkeypatch.setenv("NAPARI_DISCREG_MAX_VOXELS", "10000")
    field = np.zeros((2, 100, 100), np.float32)  # 20,000 values > 10,000
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, field)
    else:
        monkeypatch.delenv("NAPARI_DISCREG_MAX_VOXELS")
        write_field(path, field)
        monkeypatch.setenv("NAPARI_DISCREG_MAX_VOXELS", "10000")
    with pytest.raises(ValueError, match="more than the limit of 10,000 voxels"):
        read_field(path)
