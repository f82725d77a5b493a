"""User errors become napari notifications; the manifest's widgets open in napari."""

from __future__ import annotations

import numpy as np

import napari_discreg.runs.registration as registration_run
from napari_discreg._widgets import (
    AdaptationWidget,
    HistogramInspectorWidget,
    RegisterWidget,
    state_for,
)


def _errors(notes):
    return [text for level, text in notes if level == "error"]


def test_register_input_errors_are_notifications(viewer, notes, tmp_path):
    widget = RegisterWidget(viewer)
    assert widget.run() is None
    assert "choose a fixed and a moving image layer" in _errors(notes)[-1]

    viewer.add_image(np.random.default_rng(0).random((96, 96)), name="fixed")
    viewer.add_image(np.random.default_rng(1).random((3, 80, 80)), name="moving")
    widget.fixed_combo.set_layer(viewer.layers["fixed"])
    widget.moving_combo.set_layer(viewer.layers["moving"])
    assert widget.run() is None
    assert "two 2D images or two 3D stacks" in _errors(notes)[-1]

    # RGB images are registered (issue 24), stacks of them are not
    viewer.add_image(np.random.default_rng(2).random((2, 96, 96, 3)), name="colour", rgb=True)
    widget.moving_combo.set_layer(viewer.layers["colour"])
    assert widget.run() is None
    assert "stack of RGB images" in _errors(notes)[-1]

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    assert not widget.load_checkpoint(bad)
    assert "cannot load the model" in _errors(notes)[-1]
    assert state_for(viewer).model is None  # a bad file leaves the model alone

    assert widget.apply_to_layer(viewer.add_points([[1.0, 2.0]], name="pts")) is None
    assert "register first" in _errors(notes)[-1]
    assert widget.save_field(tmp_path / "f.npy") is None
    assert "register first" in _errors(notes)[-1]


def test_worker_errors_from_core_are_notifications(viewer, notes, tiny_model_path, wait_job):
    viewer.add_image(np.zeros((96, 96), np.float32), name="fixed")  # constant: core refuses it
    viewer.add_image(np.random.default_rng(0).random((96, 96)), name="moving")
    widget = RegisterWidget(viewer)
    widget.load_checkpoint(tiny_model_path)
    wait_job(widget.run())
    assert any("constant" in text for text in _errors(notes))
    assert "failed" in widget.status_label.text()
    assert widget.register_button.isEnabled()  # the GUI is usable again
    assert state_for(viewer).run is None


def test_unexpected_worker_errors_are_notifications_too(viewer, notes, monkeypatch, wait_job):

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(registration_run, "register", broken)
    viewer.add_image(np.random.default_rng(0).random((64, 64)), name="fixed")
    viewer.add_image(np.random.default_rng(1).random((64, 64)), name="moving")
    widget = RegisterWidget(viewer)
    state_for(viewer).set_model(object(), "stub")  # never used: register is broken
    wait_job(widget.run())
    [message] = _errors(notes)
    assert message.startswith("registration: RuntimeError: boom") and "this is a bug" in message
    assert widget.register_button.isEnabled()


def test_an_index_error_is_a_bug_whose_traceback_is_logged(
    viewer, notes, monkeypatch, wait_job, caplog
):
    """IndexError is never a user error (issue 27): it is logged with its traceback."""
    import logging

    from napari_discreg._widgets import _notify

    assert not issubclass(IndexError, _notify.USER_ERRORS)

    def broken(*args, **kwargs):
        raise IndexError("index 108 is out of bounds for axis 0 with size 108")

    monkeypatch.setattr(registration_run, "register", broken)
    viewer.add_image(np.random.default_rng(0).random((64, 64)), name="fixed")
    viewer.add_image(np.random.default_rng(1).random((64, 64)), name="moving")
    widget = RegisterWidget(viewer)
    state_for(viewer).set_model(object(), "stub")
    with caplog.at_level(logging.ERROR, logger="napari_discreg"):
        wait_job(widget.run())
    [message] = _errors(notes)
    assert "IndexError" in message and "this is a bug" in message
    assert any(r.exc_info and r.exc_info[0] is IndexError for r in caplog.records)


def test_errors_reach_napari_notification_manager(viewer):
    """Without monkeypatching: the message arrives in napari's own notification system."""
    from napari.utils.notifications import notification_manager

    received = []
    notification_manager.notification_ready.connect(received.append)
    try:
        viewer.add_image(np.ones((50, 50)), name="fixed")
        viewer.add_image(np.ones((2, 60, 60)), name="moving")
        widget = RegisterWidget(viewer)
        widget.fixed_combo.set_layer(viewer.layers["fixed"])
        widget.moving_combo.set_layer(viewer.layers["moving"])
        widget.run()
    finally:
        notification_manager.notification_ready.disconnect(received.append)
    assert any("two 3D stacks" in str(n.message) and n.severity == "error" for n in received)


def test_adaptation_and_inspector_errors_are_notifications(viewer, notes):
    viewer.add_image(np.random.default_rng(0).random((4, 64, 64)), name="target fixed")
    viewer.add_image(np.random.default_rng(1).random((4, 60, 60)), name="target moving")
    widget = AdaptationWidget(viewer)
    assert widget.start() is None
    assert "same shape" in _errors(notes)[-1]
    assert not widget.is_running and widget.start_button.isEnabled()
    assert not widget.keep() and not widget.revert()
    inspector = HistogramInspectorWidget(viewer)
    assert not inspector.inspect(10, 10)
    assert any(level == "warning" and "register" in text for level, text in notes)


def test_manifest_widgets_dock_in_napari_and_share_state(viewer):
    widgets = {}
    for name, cls in (
        ("Register", RegisterWidget),
        ("Histogram inspector", HistogramInspectorWidget),
        ("Adaptation", AdaptationWidget),
    ):
        _, widget = viewer.window.add_plugin_dock_widget("napari-discreg", name)
        assert isinstance(widget, cls)
        widgets[name] = widget
    # napari hands plugins a proxy of the viewer; the widgets still share one state
    states = {id(state_for(w.viewer)) for w in widgets.values()}
    assert states == {id(state_for(viewer))}
    assert state_for(viewer).register_widget is widgets["Register"]
