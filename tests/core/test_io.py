"""Image and displacement-field file IO (napari_discreg.core.files.imagefiles)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile
from skimage import io as skio
from skimage.color import rgb2gray

from napari_discreg.core.files import atomic, imagefiles


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).random((20, 30)).astype(np.float32)


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(1).random((5, 20, 30)).astype(np.float32)


def _leftovers(folder) -> list[str]:
    """Temporary files a write may have left (hidden .partial- names)."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


# ----------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext", ["tif", "tiff", "npy", "nii", "nii.gz"])
def test_lossless_round_trip(tmp_path, image, ext):
    path = imagefiles.write_image(tmp_path / f"a.{ext}", image)
    back = imagefiles.read_image(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, image)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("ext", ["tif", "npy"])
def test_stack_round_trip(tmp_path, volume, ext):
    path = imagefiles.write_image(tmp_path / f"v.{ext}", volume)
    np.testing.assert_array_equal(imagefiles.read_stack(path), volume)
    np.testing.assert_array_equal(imagefiles.read_image(path), volume[2])  # middle slice
    np.testing.assert_array_equal(imagefiles.read_image(path, index=4), volume[4])
    np.testing.assert_array_equal(imagefiles.read_image(path, axis=1, index=3), volume[:, 3])


def test_png_float_is_rescaled_to_16_bit(tmp_path, image):
    path = imagefiles.write_image(tmp_path / "a.png", image)
    raw = skio.imread(str(path))
    assert raw.dtype == np.uint16
    back = imagefiles.read_image(path)
    assert back.dtype == np.float32 and back.shape == image.shape
    expected = (image - image.min()) / (image.max() - image.min()) * 65535
    np.testing.assert_allclose(back, expected, atol=0.51)


def test_png_uint8_kept(tmp_path):
    img = np.random.default_rng(2).integers(0, 256, (16, 12)).astype(np.uint8)
    path = imagefiles.write_image(tmp_path / "a.png", img)
    assert skio.imread(str(path)).dtype == np.uint8
    np.testing.assert_array_equal(imagefiles.read_image(path), img.astype(np.float32))


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_png_becomes_gray(tmp_path, channels):
    rgb = np.random.default_rng(3).integers(0, 256, (16, 12, channels)).astype(np.uint8)
    skio.imsave(str(tmp_path / "rgb.png"), rgb, check_contrast=False)
    gray = imagefiles.read_image(tmp_path / "rgb.png")
    assert gray.shape == (16, 12) and gray.dtype == np.float32
    np.testing.assert_allclose(gray, rgb2gray(rgb[..., :3]), atol=1e-6)


def test_rgb_tiff_becomes_gray(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (16, 12, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_allclose(
        imagefiles.read_image(tmp_path / "rgb.tif"), rgb2gray(rgb), atol=1e-6
    )


def test_jpeg_reads_gray(tmp_path):
    img = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1))
    skio.imsave(str(tmp_path / "a.jpg"), img, check_contrast=False)
    back = imagefiles.read_image(tmp_path / "a.jpg")
    assert back.shape == (16, 32)
    assert np.abs(back - img).max() < 10  # lossy


def test_nifti_volume_slices_along_last_axis(tmp_path, volume):
    path = imagefiles.write_image(tmp_path / "v.nii.gz", volume)
    np.testing.assert_array_equal(imagefiles.read_image(path), volume[:, :, 15])
    np.testing.assert_array_equal(imagefiles.read_image(path, axis=0, index=1), volume[1])
    stack = imagefiles.read_stack(path)
    assert stack.shape == (30, 5, 20)
    np.testing.assert_array_equal(stack[7], volume[:, :, 7])


def test_nifti_4d_singleton_squeezed_and_series_refused(tmp_path, volume):
    nib.save(nib.Nifti1Image(volume[..., None], np.eye(4)), str(tmp_path / "v4.nii"))
    np.testing.assert_array_equal(imagefiles.read_image(tmp_path / "v4.nii"), volume[:, :, 15])
    series = np.stack([volume, volume], axis=-1)
    nib.save(nib.Nifti1Image(series, np.eye(4)), str(tmp_path / "t.nii"))
    with pytest.raises(ValueError, match="t.nii.*4D"):
        imagefiles.read_image(tmp_path / "t.nii")


def test_singleton_stack_is_2d_and_2d_file_is_stack_of_one(tmp_path, image):
    np.save(tmp_path / "one.npy", image[None])
    np.testing.assert_array_equal(imagefiles.read_image(tmp_path / "one.npy"), image)
    imagefiles.write_image(tmp_path / "a.tif", image)
    assert imagefiles.read_stack(tmp_path / "a.tif").shape == (1, 20, 30)
    # axis and index are ignored for 2D files
    np.testing.assert_array_equal(imagefiles.read_image(tmp_path / "a.tif", axis=2, index=9), image)


def test_integer_and_bool_inputs_become_float32(tmp_path):
    np.save(tmp_path / "b.npy", np.eye(8, dtype=bool))
    np.save(tmp_path / "i.npy", np.arange(64, dtype=np.int64).reshape(8, 8))
    assert imagefiles.read_image(tmp_path / "b.npy").dtype == np.float32
    imagefiles.write_image(tmp_path / "i.nii.gz", np.arange(64, dtype=np.int64).reshape(8, 8))
    np.testing.assert_array_equal(
        imagefiles.read_image(tmp_path / "i.nii.gz"), np.arange(64).reshape(8, 8)
    )


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(ValueError, match="nope.tif: no such file"):
        imagefiles.read_image(path)
    with pytest.raises(ValueError, match="nope.tif"):
        imagefiles.read_stack(path)


def test_folder_is_not_an_image(tmp_path):
    (tmp_path / "d.tif").mkdir()
    with pytest.raises(ValueError, match="d.tif: is not a file"):
        imagefiles.read_image(tmp_path / "d.tif")


def test_unknown_extension(tmp_path):
    path = tmp_path / "image.xyz"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"image.xyz: unknown image extension '\.xyz'"):
        imagefiles.read_image(path)


@pytest.mark.parametrize(
    "name", ["bad.png", "bad.jpg", "bad.tif", "bad.nii", "bad.nii.gz", "bad.npy"]
)
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError, match=f"{name}: cannot be read as"):
        imagefiles.read_image(path)


def test_truncated_tiff(tmp_path, image):
    imagefiles.write_image(tmp_path / "a.tif", image)
    data = (tmp_path / "a.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.tif"):
        imagefiles.read_image(tmp_path / "cut.tif")


def test_pickled_npy_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        imagefiles.read_image(tmp_path / "obj.npy")


def test_non_numeric_npy_refused(tmp_path):
    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(ValueError, match="s.npy: holds <U1 data"):
        imagefiles.read_image(tmp_path / "s.npy")


def test_index_and_axis_out_of_range(tmp_path, volume):
    path = imagefiles.write_image(tmp_path / "v.tif", volume)
    with pytest.raises(ValueError, match=r"v.tif: slice index 5 is out of range.*0 to 4"):
        imagefiles.read_image(path, index=5)
    with pytest.raises(ValueError, match="v.tif: slice index -1"):
        imagefiles.read_image(path, index=-1)
    with pytest.raises(ValueError, match="v.tif: axis 3 is out of range"):
        imagefiles.read_image(path, axis=3)
    with pytest.raises(ValueError, match="v.tif: axis 7"):
        imagefiles.read_stack(path, axis=7)


def test_four_dimensional_arrays_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="x.npy: holds an array of shape"):
        imagefiles.read_image(tmp_path / "x.npy")


# ---------------------------------------------------------------- writing, atomicity


def test_write_refuses_unknown_extension_and_bad_arrays(tmp_path, image):
    with pytest.raises(ValueError, match="a.jpg: cannot write"):
        imagefiles.write_image(tmp_path / "a.jpg", image)
    with pytest.raises(ValueError, match="PNG holds one 2D"):
        imagefiles.write_image(tmp_path / "a.png", np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        imagefiles.write_image(tmp_path / "a.png", np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="2D image or a 3D stack"):
        imagefiles.write_image(tmp_path / "a.tif", np.zeros(4))
    with pytest.raises(ValueError, match="cannot write <U1"):
        imagefiles.write_image(tmp_path / "a.tif", np.array([["a"]]))
    assert list(tmp_path.iterdir()) == []


def test_write_into_missing_folder(tmp_path, image):
    with pytest.raises(OSError, match="does not exist"):
        imagefiles.write_image(tmp_path / "no" / "a.tif", image)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path, image, monkeypatch):
    path = imagefiles.write_image(tmp_path / "a.tif", image)
    before = path.read_bytes()

    def broken(file, data, **kwargs):
        with open(file, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="cannot write .*a.tif.*disk full"):
        imagefiles.write_image(path, image * 2)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_temporary_sibling_keeps_extension(tmp_path):
    tmp = atomic.temporary_sibling(tmp_path / "x.nii.gz")
    assert tmp.parent == tmp_path and tmp.name.startswith(".x.partial-")
    assert tmp.name.endswith(".nii.gz")


# ------------------------------------------------------------------------- fields


@pytest.mark.parametrize("ext", ["npy", "tif"])
def test_field_round_trip(tmp_path, ext):
    field = np.random.default_rng(5).normal(size=(2, 9, 7))
    path = imagefiles.write_field(tmp_path / f"u.{ext}", field)
    back = imagefiles.read_field(path)
    assert back.dtype == np.float32 and back.shape == (2, 9, 7)
    np.testing.assert_array_equal(back, field.astype(np.float32))


def test_field_shape_checked(tmp_path):
    with pytest.raises(ValueError, match=r"must have shape \(2, H, W\)"):
        imagefiles.write_field(tmp_path / "u.npy", np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="u.png"):
        imagefiles.write_field(tmp_path / "u.png", np.zeros((2, 4, 4)))
    np.save(tmp_path / "bad.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(
        ValueError, match=r"bad.npy: a displacement field must have shape \(2, H, W\)"
    ):
        imagefiles.read_field(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="missing.npy: no such file"):
        imagefiles.read_field(tmp_path / "missing.npy")
    (tmp_path / "junk.tif").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.tif: cannot be read"):
        imagefiles.read_field(tmp_path / "junk.tif")


def test_a_multi_channel_tiff_is_not_read_as_a_volume(tmp_path):
    """Before: a 128 x 160 x 24 channel-last TIFF was read as one 160 x 24 'slice' (a
    row across the channels), and registered with exit 0."""
    tifffile = pytest.importorskip("tifffile")
    a = np.random.default_rng(0).random((128, 160, 24)).astype(np.float32)
    path = tmp_path / "channels.tif"
    tifffile.imwrite(path, a, photometric="minisblack", planarconfig="contig")  # axes YXS
    with pytest.raises(ValueError, match=r"128 x 160 image with 24 channels .*index=K"):
        imagefiles.read_image(path)
    np.testing.assert_array_equal(imagefiles.read_image(path, index=3), a[..., 3])
    with pytest.raises(ValueError, match="not a stack of slices"):
        imagefiles.read_stack(path)
    assert imagefiles.read_stack(path, axis=2).shape == (24, 128, 160)
    plain = tmp_path / "stack.tif"
    imagefiles.write_image(plain, a)  # our own stacks: pages, slices along axis 0
    assert imagefiles.read_image(plain).shape == (160, 24)


def test_a_gif_named_png_is_refused_by_name(tmp_path):
    """Before: a GIF saved as .png was read as a 50 x 3 'image' (frames x width x RGB)."""
    from PIL import Image

    a = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "g.png", format="GIF")
    with pytest.raises(ValueError, match="is a GIF image, not the PNG or JPEG its name says"):
        imagefiles.read_image(tmp_path / "g.png")
