"""Displacement fields open by drag and drop and save with File > Save Selected Layer.

The npe2 reader claims field files only (ITK displacement fields, napari-discreg TIFF
fields) and leaves plain images to other readers; the writer saves the dense field that
a displacement layer carries, with its spacing and origin.
"""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Image, Vectors

from napari_discreg._field_io import FIELD_KEY, get_field_reader, write_field_layer
from napari_discreg._widgets import RegisterWidget
from napari_discreg._widgets._register_outputs import output_name
from napari_discreg.core.files.imagefiles import load_field, write_field, write_image


def _field(h: int = 40, w: int = 52) -> np.ndarray:
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([1.5 * np.sin(cc / 9.0), -2.0 * np.cos(rr / 7.0)]).astype(np.float32)


@pytest.mark.parametrize("name", ["f.mha", "f.nii.gz", "f.tif"])
def test_a_field_file_opens_as_magnitude_and_arrows_on_its_grid(viewer, tmp_path, name):
    field = _field()
    path = write_field(tmp_path / name, field, spacing=(0.5, 2.0), origin=(10.0, -4.0))
    assert get_field_reader(str(path)) is not None
    layers = viewer.open(str(path), plugin="napari-discreg")
    magnitude, arrows = layers
    assert isinstance(magnitude, Image) and isinstance(arrows, Vectors)
    np.testing.assert_allclose(magnitude.data, np.hypot(field[0], field[1]), atol=1e-5)
    for layer in layers:
        np.testing.assert_allclose(layer.scale, (0.5, 2.0))
        np.testing.assert_allclose(layer.translate, (10.0, -4.0))
    np.testing.assert_allclose(arrows.metadata[FIELD_KEY], field, atol=1e-5)
    # each arrow starts at a pixel and points by that pixel's displacement
    start = arrows.data[:, 0].astype(int)
    np.testing.assert_allclose(arrows.data[:, 1], field[:, start[:, 0], start[:, 1]].T, atol=1e-5)


def test_plain_images_are_left_to_other_readers(tmp_path):
    image = np.random.default_rng(0).random((20, 24)).astype(np.float32)
    for name in ("image.nii.gz", "image.tif", "volume.nii"):
        path = write_image(tmp_path / name, image if "volume" not in name else image[None])
        assert get_field_reader(str(path)) is None, name
    (tmp_path / "broken.mha").write_bytes(b"not a header")
    assert get_field_reader(str(tmp_path / "broken.mha")) is None
    assert get_field_reader(str(tmp_path / "missing.mha")) is None
    field = write_field(tmp_path / "f.mha", _field())
    assert get_field_reader([str(field), str(field)]) is None  # one file at a time


def test_the_registration_field_saves_from_the_displacement_layer(
    viewer, tiny_model_path, small_pair, wait_job, tmp_path
):
    viewer.add_image(small_pair.fixed, name="fixed", scale=(0.5, 0.5), translate=(3.0, 1.0))
    viewer.add_image(small_pair.moving, name="moving", scale=(0.5, 0.5), translate=(3.0, 1.0))
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)
    wait_job(widget.run())
    run = widget.state.run
    layer = viewer.layers[output_name(run, "displacement")]
    out = tmp_path / "from_layer.mha"
    written = write_field_layer(str(out), layer.data, {"metadata": layer.metadata})
    assert written == [str(out)]
    np.testing.assert_allclose(load_field(out), run.fields[None], atol=1e-5)
    # napari's own save goes through the same contribution
    viewer.layers.selection = {layer}
    out2 = tmp_path / "saved.nii.gz"
    viewer.layers.save(str(out2), selected=True, plugin="napari-discreg")
    np.testing.assert_allclose(load_field(out2), run.fields[None], atol=1e-5)
    # and it opens again on the fixed layer's grid
    reopened = viewer.open(str(out2), plugin="napari-discreg")
    np.testing.assert_allclose(reopened[1].translate, (3.0, 1.0))
    np.testing.assert_allclose(reopened[1].scale, (0.5, 0.5))


def test_vectors_without_a_field_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="holds no displacement field"):
        write_field_layer(str(tmp_path / "x.mha"), np.zeros((1, 2, 2)), {"metadata": {}})
    assert not (tmp_path / "x.mha").exists()


@pytest.mark.parametrize(
    "direction", [(-1.0, 0.0, 0.0, 1.0), (0.0, -1.0, 1.0, 0.0), (0.8, -0.6, 0.6, 0.8)]
)
def test_a_field_with_an_itk_direction_opens_where_itk_places_it(tmp_path, direction):
    """Flipped, rotated and oblique ITK grids: the layers get the direction as
    ``rotate`` (with spacing as ``scale``, origin as ``translate``), so every pixel lies
    at the world point SimpleITK gives it (napari's axes are ITK's reversed)."""
    sitk = pytest.importorskip("SimpleITK")
    from napari_discreg._field_io import read_field_layers

    vec = np.zeros((6, 7, 2), np.float32)
    vec[..., 0], vec[..., 1] = 1.0, 2.0
    img = sitk.GetImageFromArray(vec, isVector=True)
    img.SetDirection(direction)
    img.SetSpacing((0.5, 2.0))
    img.SetOrigin((3.0, -4.0))
    path = tmp_path / "f.mha"
    sitk.WriteImage(img, str(path))
    (magnitude, kwargs, _), (arrows, arrow_kwargs, _) = read_field_layers(str(path))
    layer = Image(magnitude, **{k: kwargs[k] for k in ("scale", "translate", "rotate")})
    vectors = Vectors(arrows, **{k: arrow_kwargs[k] for k in ("scale", "translate", "rotate")})
    for r, c in [(0, 0), (2, 3), (5, 6)]:
        expected = img.TransformIndexToPhysicalPoint((c, r))[::-1]
        np.testing.assert_allclose(layer.data_to_world((r, c)), expected, atol=1e-9)
        np.testing.assert_allclose(vectors.data_to_world((r, c)), expected, atol=1e-9)
