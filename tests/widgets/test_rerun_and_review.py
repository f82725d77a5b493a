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
    widget.volume_box.every_slice_check.setChecked(True)
    widget.show_checks["displacement"].setChecked(True)
    widget.show_checks["deformation grid"].setChecked(True)
    wait_job(widget.run())
    qtbot.wait(20)
    n_all = len(_layer(viewer, "displacement").data)
    widget.volume_box.every_slice_check.setChecked(False)
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


def test_the_review_hides_the_unregistered_moving_layer_and_gives_it_back(
    viewer, tiny_model_path, small_pair, wait_job
):
    widget = _widget(viewer, small_pair.fixed, small_pair.moving, tiny_model_path)
    viewer.add_image(np.roll(small_pair.fixed, 1, axis=0), name="fixed B")
    viewer.add_image(np.roll(small_pair.moving, 2, axis=1), name="moving B")
    moving, moving_b = viewer.layers["moving"], viewer.layers["moving B"]
    widget.fixed_combo.set_layer(viewer.layers["fixed"])
    widget.moving_combo.set_layer(moving)
    # multimodal pairs blend to flat grey: the checkerboard is the default review
    assert widget.review_mode() == "checkerboard"
    wait_job(widget.run())
    review, warped = _layer(viewer, "review"), _layer(viewer, "warped")
    assert review.visible and not warped.visible
    assert not moving.visible  # no ghost of the unregistered image under the review
    assert viewer.layers["fixed"].visible
    widget.set_review_mode("blend")  # the warped image over the fixed one, and nothing else
    assert warped.visible and not review.visible and not moving.visible
    widget.set_review_mode("off")  # review off: the moving layer is back, outputs hidden
    assert moving.visible and not warped.visible and not review.visible
    widget.set_review_mode("checkerboard")
    assert not moving.visible and review.visible
    # another pair picked: the first pair's moving layer comes back at once
    widget.fixed_combo.set_layer(viewer.layers["fixed B"])
    widget.moving_combo.set_layer(moving_b)
    assert moving.visible and moving_b.visible
    wait_job(widget.run())
    assert moving.visible and not moving_b.visible
    # a moving layer the user had hidden stays hidden when the review is switched off
    widget.set_review_mode("off")
    assert moving_b.visible
    moving_b.visible = False
    widget.set_review_mode("difference")
    widget.set_review_mode("off")
    assert not moving_b.visible
    # closing the panel gives the hidden layer back
    widget.set_review_mode("blend")
    moving_b.visible = True
    widget.set_review_mode("checkerboard")
    assert not moving_b.visible
    widget.close()
    assert moving_b.visible
