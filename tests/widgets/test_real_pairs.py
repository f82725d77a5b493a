"""Inputs as users have them (issue 24 item 4): RGB layers, fixed and moving of
different sizes and spacings, a pre-alignment choice, and the result's warnings."""

from __future__ import annotations

import numpy as np
import pytest

import napari_discreg
import napari_discreg.runs.registration as registration_run
from napari_discreg._widgets import RegisterWidget, state_for
from napari_discreg._widgets._register_outputs import output_name
from napari_discreg.core.registration.review import warp_to_grid


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every ``register`` call the widget makes (through the
    registration run of ``napari_discreg.runs.registration``)."""
    real = napari_discreg.register
    seen: list[dict] = []

    def spy(fixed, moving, **kwargs):
        seen.append({"fixed": np.asarray(fixed), "moving": np.asarray(moving), **kwargs})
        return real(fixed, moving, **kwargs)

    monkeypatch.setattr(registration_run, "register", spy)
    return seen


def _out(viewer, role):
    return viewer.layers[output_name(state_for(viewer).run, role)]


def test_rgb_moving_of_another_size_and_spacing(
    viewer, tiny_model_path, small_pair, wait_job, calls, notes
):
    grey = (255 * (small_pair.moving - small_pair.moving.min()) / np.ptp(small_pair.moving)).astype(
        np.uint8
    )[4:84, 2:92]  # 80 x 90: another size than the 96 x 96 fixed image
    rgb = np.stack([grey, (0.8 * grey).astype(np.uint8), 255 - grey], axis=-1)
    viewer.add_image(small_pair.fixed, name="fixed", scale=(0.5, 0.5), translate=(3.0, 1.0))
    viewer.add_image(rgb, name="moving", rgb=True, scale=(0.6, 0.55))
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)
    assert widget.prealign() == "affine"  # the default
    widget.set_prealign("rigid")
    wait_job(widget.run())
    assert not [t for k, t in notes if k == "error"], notes
    [call] = calls
    assert call["prealign"] == "rigid"
    assert call["moving"].shape == (80, 90, 3)  # the colour image itself goes to register
    assert tuple(call["fixed_spacing"]) == (0.5, 0.5)
    assert tuple(call["moving_spacing"]) == (0.6, 0.55)
    result = state_for(viewer).run.results[None]
    assert result.displacement.shape == (2, 96, 96)  # on the fixed grid
    warped = _out(viewer, "warped")
    # the warped colour image, on the fixed grid and placed like the fixed layer
    assert warped.rgb and warped.data.shape == (96, 96, 3) and warped.data.dtype == np.uint8
    np.testing.assert_array_equal(warped.data, warp_to_grid(rgb, result.displacement))
    np.testing.assert_allclose(warped.scale, [0.5, 0.5])
    np.testing.assert_allclose(warped.translate, [3.0, 1.0])
    review = _out(viewer, "review")
    assert review.data.shape == (96, 96) and review.visible
    # a second run updates the same layers, the colour one included
    widget.set_prealign("none")
    wait_job(widget.run())
    assert calls[-1]["prealign"] == "none"
    assert _out(viewer, "warped") is warped


def test_warp_to_grid_reads_the_moving_image_in_its_own_pixels():
    moving = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    field = np.zeros((2, 3, 4))
    field[0], field[1] = 1.0, 2.0  # fixed (r, c) samples moving (r + 1, c + 2)
    np.testing.assert_array_equal(warp_to_grid(moving, field), moving[1:4, 2:6])
    labels = np.arange(35, dtype=np.uint16).reshape(5, 7)
    out = warp_to_grid(labels, field + 0.3, order=0)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, labels[1:4, 2:6])
    rgb = np.stack([moving, 2 * moving, 3 * moving], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(warp_to_grid(rgb, field), rgb[1:4, 2:6])
    # outside: the border value
    far = np.full((2, 1, 1), 100.0)
    assert warp_to_grid(moving, far)[0, 0] == moving[-1, -1]


def test_the_results_warnings_reach_the_status_line(
    viewer, tiny_model_path, small_pair, wait_job, monkeypatch, notes
):
    real = napari_discreg.register

    def doubtful(fixed, moving, **kwargs):
        result = real(fixed, moving, **kwargs)
        result.warnings = [*result.warnings, "the pre-alignment scales the area by 9.00"]
        return result

    monkeypatch.setattr(registration_run, "register", doubtful)
    viewer.add_image(small_pair.fixed, name="fixed")
    viewer.add_image(small_pair.moving, name="moving")
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)
    wait_job(widget.run())
    assert "probably wrong: " in widget.status_label.text()
    assert "scales the area by 9.00" in widget.status_label.text()
    assert any(k == "warning" and "scales the area by 9.00" in t for k, t in notes)


def test_stacks_need_as_many_slices_and_one_dimensionality(viewer, notes):
    rng = np.random.default_rng(0)
    viewer.add_image(rng.random((3, 64, 64)), name="fixed")
    viewer.add_image(rng.random((4, 60, 70)), name="moving")
    viewer.add_image(rng.random((64, 64)), name="moving 2D")
    widget = RegisterWidget(viewer)
    widget.fixed_combo.set_layer(viewer.layers["fixed"])
    widget.moving_combo.set_layer(viewer.layers["moving"])
    assert widget.run() is None
    assert "3 slices along axis 0" in notes[-1][1] and "moving one 4" in notes[-1][1]
    widget.moving_combo.set_layer(viewer.layers["moving 2D"])
    assert widget.run() is None
    assert "two 2D images or two 3D stacks" in notes[-1][1]


def test_histology_sample_registers_and_reports_the_tre(viewer, tiny_model_path, wait_job, notes):
    """The real RGB pair of different sizes, end to end, with its landmarks."""
    viewer.open_sample("napari-discreg", "histology_pair")
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)
    assert widget.fixed_combo.layer().name == "fixed (HE)"
    assert widget.moving_combo.layer().name == "moving (proSPC)"
    assert widget.fixed_landmarks_combo.layer().name == "fixed (HE) landmarks"
    assert widget.moving_landmarks_combo.layer().name == "moving (proSPC) landmarks"
    wait_job(widget.run(), timeout=300_000)
    assert not [t for k, t in notes if k == "error"], notes
    run = state_for(viewer).run
    assert run.fields[None].shape == (2, 733, 890)
    tre = run.tre
    assert tre["landmarks"] == 78
    text = widget.status_label.text()
    assert "TRE (78 landmarks)" in text
    # before: the landmarks as they are (about 22 px apart on this pair, issue 24)
    assert 10 < tre["px"]["before"]["median"] < 80
    assert _out(viewer, "warped").data.shape == (733, 890, 3)
    assert not viewer.layers["moving (proSPC)"].visible  # hidden under the review


def test_a_loaded_field_labels_and_points_with_a_moving_image_of_another_size(
    viewer, tmp_path, notes
):
    from napari_discreg.core.registration.geometry import sample_field

    rng = np.random.default_rng(0)
    viewer.add_image(rng.random((40, 50)), name="fixed", scale=(2.0, 2.0))
    moving = rng.random((60, 70)).astype(np.float32)
    viewer.add_image(moving, name="moving", scale=(1.5, 1.5), translate=(5.0, 0.0))
    labels = viewer.add_labels((moving > 0.5).astype(np.uint8), name="moving labels")
    labels.scale, labels.translate = (1.5, 1.5), (5.0, 0.0)
    widget = RegisterWidget(viewer)
    field = np.zeros((2, 40, 50), np.float32)
    field[0], field[1] = 3.0, 7.5  # on the fixed grid, in moving pixels
    np.save(tmp_path / "field.npy", field)
    run = widget.load_field(tmp_path / "field.npy")
    assert run is not None, notes
    np.testing.assert_allclose(_out(viewer, "warped").data, warp_to_grid(moving, field))
    assert _out(viewer, "warped").data.shape == (40, 50)
    warped = widget.apply_to_layer(labels)
    np.testing.assert_array_equal(warped.data, warp_to_grid(labels.data, field, order=0))
    np.testing.assert_allclose(warped.scale, [2.0, 2.0])
    # fixed points -> moving frame: x + u(x) in moving pixels, placed on the moving image
    pts = viewer.add_points(np.array([[10.0, 20.0]]), name="p", scale=(2.0, 2.0))
    out = widget.apply_to_layer(pts, points_frame="fixed")
    np.testing.assert_allclose(out.data, [[13.0, 27.5]])
    np.testing.assert_allclose(out.scale, [1.5, 1.5])
    np.testing.assert_allclose(out.translate, [5.0, 0.0])
    # and back: moving points -> fixed frame
    back = widget.apply_to_layer(out, points_frame="moving")
    np.testing.assert_allclose(back.data + sample_field(field, back.data), out.data, atol=0.01)
    np.testing.assert_allclose(back.data, [[10.0, 20.0]], atol=0.01)
    assert not [t for k, t in notes if k == "error"], notes
