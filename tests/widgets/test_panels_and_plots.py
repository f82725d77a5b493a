"""Issue 27, items 3-6: the panels as tabs that fit a 1366 x 768 screen, the adaptation's
refusal of one layer twice, inspector plots that read at a glance, the smaller gaps."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from napari.utils.theme import get_theme
from qtpy.QtCore import QPoint, QRect
from qtpy.QtWidgets import QApplication

from napari_discreg._widgets import (
    AdaptationWidget,
    HistogramInspectorWidget,
    RegisterWidget,
    state_for,
)
from napari_discreg._widgets._register_outputs import output_name
from napari_discreg._widgets.inspector import MARKER_LAYER, SHADE_ALPHA, mass_window

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


# ------------------------------------------------------------------ item 5


def _registered(viewer, pair, model_path, wait_job):
    viewer.add_image(pair.fixed, name="fixed")
    viewer.add_image(pair.moving, name="moving")
    widget = RegisterWidget(viewer)
    widget.load_checkpoint(model_path)
    wait_job(widget.run())
    return widget


def _drawn(inspector, size=(420, 620)):
    """The inspector's figure drawn at a docked panel's size; its renderer."""
    inspector.resize(*size)
    inspector.canvas.resize(size[0], max(size[1] - 100, 520))
    inspector.figure.set_size_inches(
        inspector.canvas.width() / inspector.figure.dpi,
        inspector.canvas.height() / inspector.figure.dpi,
    )
    inspector.canvas.draw()
    return inspector.figure.canvas.get_renderer()


def _overlap(a, b, tol=0.5) -> bool:
    return a.x0 < b.x1 - tol and b.x0 < a.x1 - tol and a.y0 < b.y1 - tol and b.y0 < a.y1 - tol


def test_mass_window_holds_the_mass_and_zooms_in():
    k = 15
    off = np.arange(k, dtype=float) - 7  # -7 ... 7 px
    f1 = np.zeros((k, k))
    f1[9:11, 3:5] = 0.25  # all the mass in a 2 x 2 block
    f2 = np.zeros((k, k))
    f2[10, 4] = 1.0
    h = {"offsets": off}
    for head, p in (("f1", f1), ("f2", f2)):
        h[f"cdf_rows_{head}"] = np.cumsum(p.sum(1))
        h[f"cdf_cols_{head}"] = np.cumsum(p.sum(0))
    (r0, r1), (c0, c1) = mass_window(h)
    assert r0 <= off[9] - 0.5 and r1 >= off[10] + 0.5  # rows 9-10 inside
    assert c0 <= off[3] - 0.5 and c1 >= off[4] + 0.5
    assert r1 - r0 < k and c1 - c0 < k  # narrower than the 15 labels
    assert r1 - r0 >= 5 and c1 - c0 >= 5  # never fewer than five bins
    # a mark (the true displacement) far from the mass is kept in view
    (r0, r1), (c0, c1) = mass_window(h, [(-6.0, 6.0)])
    assert r0 <= -6.5 and c1 >= 6.5


def test_inspector_plots_read_at_a_glance(viewer, tiny_model_path, small_pair, wait_job):
    _registered(viewer, small_pair, tiny_model_path, wait_job)
    inspector = HistogramInspectorWidget(viewer)
    assert inspector.zoom_check.isChecked()  # zoomed to the mass by default
    assert inspector.inspect(41.0, 58.0)
    renderer = _drawn(inspector)
    fig = inspector.figure
    fig_box = fig.bbox
    axes = fig.axes
    boxes = [ax.get_window_extent(renderer) for ax in axes]
    # legends: one, outside every axes (data areas and colour bar alike)
    legends = list(fig.legends) + [ax.get_legend() for ax in axes if ax.get_legend()]
    assert len(legends) == 1
    legend_box = legends[0].get_window_extent(renderer)
    labels = " ".join(t.get_text() for t in legends[0].get_texts())
    assert "expected" in labels and "F1" in labels and "EMD" in labels
    assert not any(_overlap(legend_box, box) for box in boxes), legend_box
    assert fig_box.x0 <= legend_box.x0 and legend_box.x1 <= fig_box.x1 + 0.5
    # no clipped or colliding labels: every axis label and title inside the figure, and
    # off every other axes (the F2 label no longer runs into the colour bar)
    for ax in axes:
        for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
            if not text.get_text():
                continue
            box = text.get_window_extent(renderer)
            assert fig_box.x0 - 0.5 <= box.x0 and box.x1 <= fig_box.x1 + 0.5, text.get_text()
            assert fig_box.y0 - 0.5 <= box.y0 and box.y1 <= fig_box.y1 + 0.5, text.get_text()
            others = [b for a, b in zip(axes, boxes, strict=True) if a is not ax]
            assert not any(_overlap(box, b) for b in others), text.get_text()
    # zoomed limits hold (nearly) all of each head's mass
    h = inspector.last_histograms
    off = h["offsets"]
    rows, cols = inspector.last_limits["rows"], inspector.last_limits["cols"]
    in_rows = (off >= rows[0]) & (off <= rows[1])
    in_cols = (off >= cols[0]) & (off <= cols[1])
    for head in ("f1", "f2"):
        p = h[head] / h[head].sum()
        assert p[np.ix_(in_rows, in_cols)].sum() >= 0.99 - 1e-6
    hist = axes[0]
    assert hist.get_xlim() == pytest.approx(cols)
    assert sorted(hist.get_ylim()) == pytest.approx(sorted(rows))
    # the full range is a click away
    inspector.zoom_check.setChecked(False)
    d = off[1] - off[0]
    full = (off[0] - d / 2, off[-1] + d / 2)
    assert inspector.last_limits == {"rows": pytest.approx(full), "cols": pytest.approx(full)}
    assert inspector.figure.axes[0].get_xlim() == pytest.approx(full)


def _contrast(a, b) -> float:
    """WCAG contrast ratio of two RGB colours."""

    def lum(c):
        c = np.asarray(c, dtype=float)
        c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    lo, hi = sorted((lum(a), lum(b)))
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_emd_shading_stands_out_in_both_themes(
    viewer, tiny_model_path, small_pair, wait_job, theme
):
    _registered(viewer, small_pair, tiny_model_path, wait_job)
    inspector = HistogramInspectorWidget(viewer)
    viewer.theme = theme
    assert inspector.inspect(41.0, 58.0)
    shades = [
        c for ax in inspector.figure.axes for c in ax.collections if isinstance(c, PolyCollection)
    ]
    assert len(shades) == 2  # the row and the column cumulative plots
    background = np.asarray(mcolors.to_rgb(get_theme(theme).background.as_hex()))
    for shade in shades:
        rgba = shade.get_facecolor()[0]
        alpha = rgba[3]
        assert alpha == pytest.approx(SHADE_ALPHA)
        seen = alpha * rgba[:3] + (1 - alpha) * background  # over the axes' background
        assert _contrast(seen, background) >= 2.0, (theme, mcolors.to_hex(rgba))


# ------------------------------------------------------------------ item 6


def test_closing_the_inspector_removes_its_marker(
    make_napari_viewer, tiny_model_path, small_pair, wait_job
):
    viewer = make_napari_viewer()
    _registered(viewer, small_pair, tiny_model_path, wait_job)
    dock, inspector = viewer.window.add_plugin_dock_widget(PLUGIN, "Histogram inspector")
    assert inspector.inspect(41.0, 58.0)
    assert MARKER_LAYER in viewer.layers
    dock.title.close_button.click()  # what the panel's x does
    assert MARKER_LAYER not in viewer.layers
    assert inspector._on_mouse_drag not in viewer.mouse_drag_callbacks
    # closed as a plain widget too
    inspector = HistogramInspectorWidget(viewer)
    assert inspector.inspect(41.0, 58.0)
    assert MARKER_LAYER in viewer.layers
    inspector.close()
    assert MARKER_LAYER not in viewer.layers


def test_the_status_line_never_keeps_an_earlier_run_after_an_error(viewer, small_pair, notes):
    viewer.add_image(small_pair.fixed, name="fixed")
    viewer.add_image(small_pair.moving, name="moving")
    widget = RegisterWidget(viewer)
    widget.status_label.setText("registered 1 slice(s) with bspline")  # an earlier run
    widget.moving_combo.set_layer(viewer.layers["fixed"])
    assert widget.run() is None
    assert widget.status_label.text().startswith("not started:")
    assert "both the fixed and the moving" in widget.status_label.text()
    widget.status_label.setText("registered 1 slice(s) with bspline")
    assert widget.load_field("/nonexistent/field.npy") is None
    assert widget.status_label.text().startswith("cannot use the field")
    widget.status_label.setText("registered 1 slice(s) with bspline")
    assert widget.save_field("/nonexistent/field.npy") is None  # nothing registered yet
    assert widget.status_label.text().startswith("cannot save the field")


def test_adam_steps_have_a_row_of_their_own(viewer):
    widget = RegisterWidget(viewer)
    spin = widget.model_box.adam_steps_spin
    assert spin.suffix() == ""  # the words are the row's label: nothing to clip
    assert widget.model_box.layout().labelForField(spin).text() == "Adam steps"


def test_output_names_are_short_and_never_overwrite_another_pair(
    viewer, tiny_model_path, small_pair, wait_job
):
    viewer.add_image(small_pair.fixed, name="fixed (T1)")
    viewer.add_image(small_pair.moving, name="moving (T2-like)")
    viewer.add_image(np.roll(small_pair.fixed, 1, axis=0), name="fixed B")
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)

    def register(fixed, moving="moving (T2-like)"):
        widget.fixed_combo.set_layer(viewer.layers[fixed])
        widget.moving_combo.set_layer(viewer.layers[moving])
        wait_job(widget.run())
        return state_for(viewer).run

    run_a = register("fixed (T1)")
    # named after the moving layer: 28 characters where "moving (T2-like) → fixed (T1)
    # discrepancy" had 41, which napari's layer list cut in the middle
    assert output_name(run_a, "discrepancy") == "moving (T2-like) discrepancy"
    assert "moving (T2-like) warped" in viewer.layers
    warped_a = viewer.layers["moving (T2-like) warped"].data.copy()
    # the same moving image onto a second fixed one: both names, the first pair untouched
    run_b = register("fixed B")
    assert output_name(run_b, "warped") == "moving (T2-like) → fixed B warped"
    assert output_name(run_b, "warped") in viewer.layers
    np.testing.assert_array_equal(viewer.layers["moving (T2-like) warped"].data, warped_a)
    # registering either pair again updates its own layers: none added
    n = len(viewer.layers)
    register("fixed B")
    register("fixed (T1)")
    assert len(viewer.layers) == n
    # a layer of the user's with an output's short name is never overwritten
    for layer in [la for la in viewer.layers if la.name.startswith("moving (T2-like) ")]:
        viewer.layers.remove(layer)  # every output of both pairs
    mine = viewer.add_image(np.zeros((96, 96), np.float32), name="moving (T2-like) review")
    run_c = register("fixed (T1)")
    assert output_name(run_c, "review") == "moving (T2-like) → fixed (T1) review"
    assert not mine.data.any()
