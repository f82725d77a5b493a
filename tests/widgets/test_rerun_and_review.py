"""Re-registering after the details were shown, and the review view (issue 27, items 1-2)."""

from __future__ import annotations

import numpy as np

from napari_discreg._widgets import RegisterWidget, state_for
from napari_discreg._widgets._register_outputs import output_name


def _widget(viewer, fixed, moving, model_path) -> RegisterWidget:
    viewer.add_image(fixed, name="fixed")
    viewer.add_image(moving, name="moving")
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(model_path)
    return widget


def _layer(viewer, role):
    return viewer.layers[output_name(state_for(viewer).run, role)]


def _no_error(widget, notes):
    assert "failed" not in widget.status_label.text(), widget.status_label.text()
    assert not [t for k, t in notes if k == "error"], notes


def test_rerun_after_showing_arrows_with_fewer_arrows_2d(
    viewer, tiny_model_path, small_pair, wait_job, notes, qtbot
):
    widget = _widget(viewer, small_pair.fixed, small_pair.moving, tiny_model_path)
    wait_job(widget.run())
    widget.show_checks["displacement"].setChecked(True)
    widget.show_checks["deformation grid"].setChecked(True)
    qtbot.wait(20)  # let napari draw the arrows once
    n_before = len(_layer(viewer, "displacement").data)
    widget.vector_step_spin.setValue(3)
    wait_job(widget.run())
    qtbot.wait(20)
    _no_error(widget, notes)
    arrows = _layer(viewer, "displacement")
    assert 0 < len(arrows.data) < n_before
    assert arrows.visible
    # the layer draws its new data: napari's view of it matches the data
    assert len(arrows._view_data) == len(arrows.data)
    # and back to more arrows
    widget.vector_step_spin.setValue(1)
    wait_job(widget.run())
    _no_error(widget, notes)
    assert len(_layer(viewer, "displacement").data) == n_before


def test_rerun_of_one_slice_after_every_slice_with_arrows_3d(
    viewer, tiny_model_path, small_targets, wait_job, notes, qtbot
):
    fixed, moving = small_targets
    widget = _widget(
        viewer,
        np.concatenate([fixed, fixed[:1]]),
        np.concatenate([moving, moving[:1]]),
        tiny_model_path,
    )
    widget.every_slice_check.setChecked(True)
    widget.show_checks["displacement"].setChecked(True)
    widget.show_checks["deformation grid"].setChecked(True)
    wait_job(widget.run())
    qtbot.wait(20)
    n_all = len(_layer(viewer, "displacement").data)
    widget.every_slice_check.setChecked(False)
    viewer.dims.set_current_step(0, 1)
    wait_job(widget.run())
    qtbot.wait(20)
    _no_error(widget, notes)
    arrows, grid = _layer(viewer, "displacement"), _layer(viewer, "deformation grid")
    assert 0 < len(arrows.data) < n_all
    assert np.all(arrows.data[:, 0, 0] == 1) and np.all(grid.data[:, 0, 0] == 1)
    assert _layer(viewer, "warped").data.shape[0] == 1
    assert _layer(viewer, "discrepancy").data.shape[0] == 1
    # a loaded field afterwards shows without an uncaught error
    run = state_for(viewer).run
    widget.show_run(run)
    _no_error(widget, notes)


def test_rerun_with_fewer_arrows_while_they_are_hidden(
    viewer, tiny_model_path, small_pair, wait_job, notes, qtbot
):
    widget = _widget(viewer, small_pair.fixed, small_pair.moving, tiny_model_path)
    widget.show_checks["displacement"].setChecked(True)
    wait_job(widget.run())
    qtbot.wait(20)
    widget.show_checks["displacement"].setChecked(False)
    n_before = len(_layer(viewer, "displacement").data)
    widget.vector_step_spin.setValue(4)
    wait_job(widget.run())
    _no_error(widget, notes)
    widget.show_checks["displacement"].setChecked(True)  # shown again: drawn from new data
    qtbot.wait(20)
    arrows = _layer(viewer, "displacement")
    assert 0 < len(arrows.data) < n_before
    assert len(arrows._view_data) == len(arrows.data)
