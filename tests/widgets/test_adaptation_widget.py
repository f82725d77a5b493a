"""The adaptation widget: progress, Stop within one step, Keep/Revert, Save, no leaked workers."""

from __future__ import annotations

import numpy as np
import torch
from qtpy.QtCore import QThreadPool

from napari_discreg import load_model, register
from napari_discreg._widgets import AdaptationWidget, RegisterWidget, state_for


def _adaptation(viewer, small_targets, model, *, adapt_config, data_config, steps):
    """Target stacks as layers, ``model`` as the current model, a fast adaptation widget."""
    fixed, moving = small_targets
    viewer.add_image(fixed, name="target fixed")
    viewer.add_image(moving, name="target moving")
    state_for(viewer).set_model(model, "tiny")
    widget = AdaptationWidget(viewer)
    widget.adapt_config = adapt_config
    widget.data_config = data_config
    widget.steps_spin.setValue(steps)
    return widget


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adapt_progress_stop_keep_reregister_revert_save(
    viewer, qtbot, tiny_model, small_pair, small_targets, tmp_path, wait_job, notes, fast
):
    before = _weights(tiny_model)
    viewer.add_image(small_pair.fixed, name="fixed")
    viewer.add_image(small_pair.moving, name="moving")
    register_widget = RegisterWidget(viewer)
    widget = _adaptation(viewer, small_targets, tiny_model, **fast, steps=200)
    assert widget.fixed_combo.layer().name == "target fixed"
    assert widget.moving_combo.layer().name == "target moving"
    assert (
        register_widget.fixed_combo.layer().name,
        register_widget.moving_combo.layer().name,
    ) == (
        "fixed",
        "moving",
    )
    assert widget.discrepancy() == "pemd"  # the default
    job = widget.start()
    assert job is not None and widget.is_running
    assert not widget.start_button.isEnabled() and widget.stop_button.isEnabled()
    qtbot.waitUntil(lambda: len(widget.records) >= 2, timeout=60_000)
    assert widget.progress.value() >= 1 and widget.progress.maximum() == 200
    assert widget.plot.iterations and np.isfinite(widget.plot.source_ce).all()
    assert widget.records[0].criterion is not None  # the selection criterion at iteration 0
    widget.stop()
    at_stop = widget.worker_iteration  # the worker may be ahead of the records delivered so far
    wait_job(job)
    assert widget.records[-1].iteration <= at_stop + 1  # stopped within one iteration
    assert widget.records[-1].iteration < 200
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()
    adapted = widget.adapted_model
    assert adapted is not None and adapted is not tiny_model
    # adaptation worked on a clone: the current model is untouched until Keep
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert widget.keep_button.isEnabled() and widget.revert_button.isEnabled()

    # Keep: the Register widget now registers with the adapted model
    assert widget.keep()
    assert state_for(viewer).model is adapted
    assert register_widget.model_label.text().startswith("adapted")
    wait_job(widget.reregister())
    run = state_for(viewer).run
    assert run.model_name.startswith("adapted")
    expected = register(small_pair.fixed, small_pair.moving, model=adapted)
    np.testing.assert_allclose(run.results[None].probabilities, expected.probabilities, atol=1e-6)

    # Save: the file holds exactly the adapted weights
    path = widget.save(tmp_path / "adapted.safetensors")
    reloaded = load_model(path, "cpu")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in adapted.state_dict().items())

    # Revert: the previous model with bit-identical weights
    assert widget.revert()
    current = state_for(viewer).model
    assert current is tiny_model and state_for(viewer).model_name == "tiny"
    after = current.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert register_widget.model_label.text() == "tiny"
    assert not [n for n in notes if n[0] == "error"]


def test_closing_widget_or_viewer_stops_the_worker(
    make_napari_viewer, qtbot, tiny_model_path, small_targets, fast
):
    for close_viewer in (False, True):
        viewer = make_napari_viewer()
        widget = _adaptation(
            viewer,
            small_targets,
            load_model(tiny_model_path, "cpu"),
            **fast,
            steps=10_000,
        )
        if close_viewer:  # docked in a (hidden) viewer window, as napari's plugin menu does
            viewer.window.add_dock_widget(widget, name="adaptation")
        job = widget.start()
        records = widget.records
        qtbot.waitUntil(lambda: len(records) >= 1, timeout=60_000)  # noqa: B023 - used at once
        if close_viewer:
            viewer.close()
        else:
            widget.close()
        assert not job.is_running  # closing waited for the worker
        assert job.stop_event.is_set()
        assert widget.records[-1].iteration < 10_000
        qtbot.waitUntil(
            lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=5_000
        )
