"""The napari experience: results never lost or mixed up, a review view, a Stop that
answers, panels that fit a laptop screen, help where a user looks (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Image, Vectors
from qtpy.QtWidgets import (
    QAbstractButton,
    QAbstractSpinBox,
    QComboBox,
    QScrollArea,
)

from napari_discreg._widgets import (
    AdaptationWidget,
    HistogramInspectorWidget,
    RegisterWidget,
    state_for,
)
from napari_discreg._widgets._layers import is_output
from napari_discreg._widgets._register_outputs import output_name


def _pair_widget(viewer, pair, model_path) -> RegisterWidget:
    """A Register widget with the tiny model over layers "fixed" and "moving" of ``pair``."""
    viewer.add_image(pair.fixed, name="fixed")
    viewer.add_image(pair.moving, name="moving")
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(model_path)
    return widget


def _registered_pair(viewer, widget, pair, wait_job, *, fixed="fixed", moving="moving"):
    widget.fixed_combo.set_layer(viewer.layers[fixed])
    widget.moving_combo.set_layer(viewer.layers[moving])
    wait_job(widget.run())
    return state_for(viewer).run


@pytest.fixture
def two_pairs(viewer, small_pair):
    viewer.add_image(small_pair.fixed, name="fixed")
    viewer.add_image(small_pair.moving, name="moving")
    viewer.add_image(np.roll(small_pair.fixed, 1, axis=0), name="fixed B")
    viewer.add_image(np.roll(small_pair.moving, 2, axis=1), name="moving B")
    return viewer


def test_each_pair_keeps_its_own_outputs_and_a_rerun_updates_them(
    two_pairs, tiny_model_path, small_pair, wait_job
):
    viewer = two_pairs
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)
    run_a = _registered_pair(viewer, widget, small_pair, wait_job)
    names_a = {layer.name for layer in viewer.layers if is_output(layer)}
    assert output_name(run_a, "warped") == "moving warped"  # short: see test_panels_and_plots
    assert {output_name(run_a, r) for r in ("warped", "displacement", "discrepancy")} <= names_a
    warped_a = viewer.layers[output_name(run_a, "warped")].data.copy()

    run_b = _registered_pair(
        viewer, widget, small_pair, wait_job, fixed="fixed B", moving="moving B"
    )
    names = {layer.name for layer in viewer.layers if is_output(layer)}
    assert names_a < names  # the first pair's outputs are all still there
    assert output_name(run_b, "warped") in names
    np.testing.assert_array_equal(viewer.layers[output_name(run_a, "warped")].data, warped_a)
    # every output says what it is and which pair it belongs to
    meta = viewer.layers[output_name(run_b, "displacement")].metadata["napari_discreg"]
    assert meta["output"] == "displacement"
    assert meta["pair"] == {"fixed": "fixed B", "moving": "moving B"}

    # re-running pair A updates its own layers in place: no new layers
    n = len(viewer.layers)
    layer = viewer.layers[output_name(run_a, "warped")]
    _registered_pair(viewer, widget, small_pair, wait_job)
    assert len(viewer.layers) == n
    assert viewer.layers[output_name(run_a, "warped")] is layer


def test_outputs_are_never_offered_as_inputs(viewer, tiny_model_path, small_pair, wait_job):
    widget = _pair_widget(viewer, small_pair, tiny_model_path)
    wait_job(widget.run())
    HistogramInspectorWidget(viewer).inspect(40, 40)  # adds its marker layer
    outputs = [layer.name for layer in viewer.layers if is_output(layer)]
    assert "inspected point" in outputs
    adaptation = AdaptationWidget(viewer)
    for combo in (
        widget.fixed_combo,
        widget.moving_combo,
        widget.apply_combo,
        adaptation.fixed_combo,
        adaptation.moving_combo,
    ):
        offered = [combo.itemText(i) for i in range(combo.count())]
        assert not set(outputs) & set(offered), (combo, offered)
    # the moving layer goes away: the box does not switch to an output on its own
    viewer.layers.remove("moving")
    current = widget.moving_combo.layer()
    assert current is None or not is_output(current)


def test_the_same_layer_as_fixed_and_moving_is_refused(viewer, small_pair, notes):
    viewer.add_image(small_pair.fixed, name="fixed")
    viewer.add_image(small_pair.moving, name="moving")
    widget = RegisterWidget(viewer)
    widget.moving_combo.set_layer(viewer.layers["fixed"])
    widget.fixed_combo.set_layer(viewer.layers["fixed"])
    assert widget.run() is None
    assert any(
        level == "error" and "both the fixed and the moving" in text for level, text in notes
    )
    assert not [layer for layer in viewer.layers if is_output(layer)]


def test_status_is_cleared_when_the_moving_layer_goes_away_mid_run(
    viewer, tiny_model_path, small_pair, wait_job, qtbot
):
    widget = _pair_widget(viewer, small_pair, tiny_model_path)
    job = widget.run()
    viewer.layers.remove("moving")
    wait_job(job)
    text = widget.status_label.text()
    assert "registering" not in text and text  # says what happened, never stale
    assert widget.register_button.isEnabled()


def test_review_view_modes_and_hidden_details(viewer, tiny_model_path, small_pair, wait_job):
    widget = _pair_widget(viewer, small_pair, tiny_model_path)
    wait_job(widget.run())
    run = state_for(viewer).run

    def layer(role):
        return viewer.layers[output_name(run, role)]

    # default: the checkerboard (multimodal pairs); field, grid, discrepancy hidden
    assert widget.review_mode() == "checkerboard"
    assert layer("review").visible and not layer("warped").visible
    for role in ("displacement", "deformation grid", "discrepancy"):
        assert not layer(role).visible, role
    # blend: the warped image at 50 % over the fixed one
    widget.set_review_mode("blend")
    assert layer("warped").visible and layer("warped").opacity == pytest.approx(0.5)
    assert not layer("review").visible
    # checkerboard: tiles of the fixed and the warped image alternate
    widget.set_review_mode("checkerboard")
    review = layer("review")
    assert review.visible and not layer("warped").visible
    board = review.data
    assert board.shape == small_pair.fixed.shape
    tile = max(8, min(board.shape) // 8)
    f = (small_pair.fixed - small_pair.fixed.min()) / np.ptp(small_pair.fixed)
    np.testing.assert_allclose(board[:tile, :tile], f[:tile, :tile], atol=1e-5)
    # difference: |fixed - warped| of the normalised images, in a colour map
    widget.set_review_mode("difference")
    assert layer("review").visible and layer("review").colormap.name == "inferno"
    assert float(layer("review").data.min()) >= 0.0
    with pytest.raises(ValueError, match="review mode"):
        widget.set_review_mode("overlay")
    # the check boxes show the details
    widget.show_checks["displacement"].setChecked(True)
    widget.show_checks["deformation grid"].setChecked(True)
    assert layer("displacement").visible and layer("deformation grid").visible
    assert isinstance(layer("displacement"), Vectors) and isinstance(layer("review"), Image)
    # a new registration keeps the chosen view
    wait_job(widget.run())
    assert layer("review").visible and layer("displacement").visible


def test_register_progress_moves_in_steps_and_stop_answers(
    viewer, tiny_model_path, small_pair, wait_job, qtbot
):
    widget = _pair_widget(viewer, small_pair, tiny_model_path)
    widget.model_box.set_method("network+adam")
    widget.model_box.adam_steps_spin.setValue(200)
    values: list[int] = []
    widget.progress.valueChanged.connect(values.append)
    wait_job(widget.run())
    top = widget.progress.maximum()
    between = {v for v in values if 0 < v < top}
    assert len(between) > 5  # per optimiser step, not 0 -> 100 %
    assert values == sorted(values)
    # Stop during the refinement: the job ends without waiting for the other steps
    widget.model_box.adam_steps_spin.setValue(5000)
    job = widget.run()
    qtbot.waitUntil(
        lambda: 0 < widget.progress.value() < widget.progress.maximum() // 2, timeout=30_000
    )
    widget.stop()
    qtbot.waitUntil(lambda: not job.is_running, timeout=10_000)
    assert widget.progress.value() < widget.progress.maximum()
    assert "registering" not in widget.status_label.text()
    assert widget.register_button.isEnabled() and not widget.stop_button.isEnabled()


def test_every_control_has_a_tooltip(viewer):
    widgets = [RegisterWidget(viewer), AdaptationWidget(viewer), HistogramInspectorWidget(viewer)]
    missing = []
    for widget in widgets:
        for kind in (QAbstractButton, QAbstractSpinBox, QComboBox):
            for control in widget.findChildren(kind):
                if control.parent() is not None and type(control).__name__.startswith("Q"):
                    # Qt's internal buttons (scroll arrows, tool buttons of a toolbar)
                    if control.objectName().startswith("qt_"):
                        continue
                if not control.toolTip().strip():
                    missing.append(
                        f"{type(widget).__name__}: {type(control).__name__} "
                        f"{getattr(control, 'text', lambda: '')()!r}"
                    )
    assert not missing, "\n".join(missing)


def test_plots_say_what_they_show(viewer, tiny_model_path, small_pair, wait_job):
    inspector = HistogramInspectorWidget(viewer)
    adaptation = AdaptationWidget(viewer)
    for plot in (inspector, adaptation.plot):
        assert plot.caption_label.text() and not plot.caption_label.isHidden()
    widget = _pair_widget(viewer, small_pair, tiny_model_path)
    wait_job(widget.run())
    inspector.inspect(40, 40)
    (legend,) = inspector.figure.legends  # one legend, outside the plots (issue 27)
    labels = " ".join(t.get_text() for t in legend.get_texts())
    assert "expected" in labels


def test_the_three_panels_fit_a_1366_by_768_screen(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    for widget in (
        RegisterWidget(viewer),
        HistogramInspectorWidget(viewer),
        AdaptationWidget(viewer),
    ):
        viewer.window.add_dock_widget(widget, name=type(widget).__name__, area="right")
    window = viewer.window._qt_window
    hint = window.minimumSizeHint()
    assert hint.height() <= 768 and hint.width() <= 1366, hint
    window.resize(1366, 740)
    qtbot.wait(50)
    assert window.height() <= 768
    # the buttons that end a job or act on its result stay reachable: outside the scroll area
    adaptation = [w for w in viewer.window._qt_window.findChildren(AdaptationWidget)][0]
    scroll = adaptation.findChild(QScrollArea)
    for button in (adaptation.keep_button, adaptation.revert_button, adaptation.save_button):
        assert not scroll.isAncestorOf(button)


def test_saved_itk_field_carries_the_layer_spacing_and_origin(
    viewer, tiny_model_path, small_pair, wait_job, tmp_path
):
    sitk = pytest.importorskip("SimpleITK")
    viewer.add_image(small_pair.fixed, name="fixed", scale=(0.5, 2.0), translate=(10.0, -4.0))
    viewer.add_image(small_pair.moving, name="moving", scale=(0.5, 2.0), translate=(10.0, -4.0))
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)
    wait_job(widget.run())
    field = state_for(viewer).run.fields[None]
    out = widget.save_field(tmp_path / "field.nii.gz")
    image = sitk.ReadImage(str(out))
    np.testing.assert_allclose(image.GetSpacing(), (2.0, 0.5))
    np.testing.assert_allclose(image.GetOrigin(), (-4.0, 10.0))  # the fixed layer's translate
    vec = sitk.GetArrayFromImage(image)
    np.testing.assert_allclose(vec[..., 0], field[1] * 2.0, atol=1e-5)  # x: columns, in mm
    np.testing.assert_allclose(vec[..., 1], field[0] * 0.5, atol=1e-5)
    # and it loads back as the same field
    widget.load_field(out)
    np.testing.assert_allclose(state_for(viewer).run.fields[None], field, atol=1e-5)


def test_motion_beyond_the_capture_range_is_said_in_the_status(
    viewer, tiny_model_path, small_pair, wait_job
):
    viewer.add_image(small_pair.fixed, name="fixed")
    viewer.add_image(np.roll(small_pair.fixed, 12, axis=1), name="moving")  # 12 px > +/-3 px
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)
    widget.model_box.set_method("network")
    wait_job(widget.run())
    assert state_for(viewer).run.results[None].capture_warning is not None
    assert "capture range" in widget.status_label.text()
    # the default method reaches further and says nothing of the kind
    widget.model_box.set_method("bspline")
    wait_job(widget.run())
    assert "capture range" not in widget.status_label.text()
