"""Issue 27, items 3-4: the panels as tabs that fit a 1366 x 768 screen, the adaptation's
refusal of one layer twice."""

from __future__ import annotations

from qtpy.QtCore import QPoint, QRect
from qtpy.QtWidgets import QApplication

from napari_discreg._widgets import (
    AdaptationWidget,
    state_for,
)

PLUGIN = "napari-discreg"
PANELS = ("Register", "Histogram inspector", "Adaptation")
SCREEN = (1366, 768)


def _rect_in(widget, ancestor) -> QRect:
    """``widget``'s rectangle in ``ancestor``'s coordinates."""
    return QRect(widget.mapTo(ancestor, QPoint(0, 0)), widget.size())


def _shown_whole(widget, area) -> bool:
    """``widget`` is visible, laid out and inside ``area`` (a widget above it) entirely."""
    rect = _rect_in(widget, area)
    return (
        widget.isVisible()
        and widget.height() > 0
        and widget.width() > 0
        and area.rect().contains(rect)
    )


def _open_panels(viewer, qtbot):
    """The three panels opened one after the other, as from napari's Plugins menu."""
    docks = {}
    for name in PANELS:
        dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        docks[name] = (dock, widget)
    qtbot.wait(20)  # the panels join their tab group on the next turn of the event loop
    return docks


def test_panels_opened_together_are_tabs(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    docks = _open_panels(viewer, qtbot)
    window = viewer.window._qt_window
    register_dock = docks["Register"][0]
    tabbed = set(window.tabifiedDockWidgets(register_dock))
    assert {docks["Histogram inspector"][0], docks["Adaptation"][0]} <= tabbed
    # a panel of the plugin alone in a viewer is not in a tab group
    other = make_napari_viewer()
    dock, _ = other.window.add_plugin_dock_widget(PLUGIN, "Register")
    qtbot.wait(20)
    assert other.window._qt_window.tabifiedDockWidgets(dock) == []


def test_run_controls_and_live_plot_are_visible_at_1366_by_768(
    make_napari_viewer, qtbot, tiny_model, small_pair, small_targets, fast, wait_job
):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(small_pair.fixed, name="fixed")
    viewer.add_image(small_pair.moving, name="moving")
    viewer.add_image(small_targets[0], name="target fixed")
    viewer.add_image(small_targets[1], name="target moving")
    state_for(viewer).set_model(tiny_model, "tiny")
    docks = _open_panels(viewer, qtbot)
    window = viewer.window._qt_window
    window.resize(*SCREEN)
    qtbot.waitExposed(window)
    qtbot.wait(50)
    assert window.frameGeometry().height() <= SCREEN[1] + 40  # a title bar at most
    long_status = (
        "registered 1 slice(s) with the network coarse to fine (shipped pretrained); mean "
        "head discrepancy (pEMD) 0.581 bins; TRE (78 landmarks): median 12.31 → 2.05 px"
    )
    for name, (dock, widget) in docks.items():
        dock.raise_()
        QApplication.processEvents()
        qtbot.wait(20)
        if name == "Histogram inspector":  # a plot, no job: its canvas shows
            assert dock.height() > 400, dock.height()
            assert _shown_whole(widget.pick_check, dock)
            continue
        run_button = widget.register_button if name == "Register" else widget.start_button
        widget.status_label.setText(long_status)
        QApplication.processEvents()
        for control in (run_button, widget.stop_button, widget.progress, widget.status_label):
            assert _shown_whole(control, dock), (name, control, _rect_in(control, dock))
            assert _shown_whole(control, window)
            assert not widget.scroll_area.isAncestorOf(control)  # never scrolled away
        # the status line is not cut: it has the height its wrapped text needs
        label = widget.status_label
        assert label.height() >= label.heightForWidth(label.width()), name
        # and the panel's form scrolls in more than a sliver
        assert widget.scroll_area.viewport().height() > 250, (name, widget.scroll_area.height())

    # an adaptation run: its live plot is in view while it runs, without scrolling
    dock, adaptation = docks["Adaptation"]
    dock.raise_()
    adaptation.adapt_config = fast["adapt_config"]
    adaptation.data_config = fast["data_config"]
    adaptation.steps_spin.setValue(10_000)
    adaptation.scroll_area.verticalScrollBar().setValue(0)  # the form's top, as opened
    job = adaptation.start()
    assert job is not None
    qtbot.waitUntil(lambda: len(adaptation.records) >= 2, timeout=60_000)
    QApplication.processEvents()
    viewport = adaptation.scroll_area.viewport()
    canvas = adaptation.plot.canvas
    assert _shown_whole(canvas, viewport), (_rect_in(canvas, viewport), viewport.rect())
    assert _shown_whole(adaptation.status_label, dock)
    assert "iteration" in adaptation.status_label.text()
    adaptation.stop()
    wait_job(job)


# ------------------------------------------------------------------ item 4


def test_adaptation_refuses_the_same_layer_as_fixed_and_moving(viewer, small_targets, notes):
    viewer.add_image(small_targets[0], name="target fixed")
    viewer.add_image(small_targets[1], name="target moving")
    widget = AdaptationWidget(viewer)
    widget.status_label.setText("finished after 30 of 36 iterations")  # an earlier run
    same = viewer.layers["target fixed"]
    widget.moving_combo.set_layer(same)
    widget.fixed_combo.set_layer(same)
    assert widget.fixed_combo.layer() is widget.moving_combo.layer() is same
    assert widget.start() is None
    assert not widget.is_running
    errors = [text for level, text in notes if level == "error"]
    assert errors and "both the fixed and the moving target" in errors[-1]
    assert widget.status_label.text().startswith("not started:")
