"""The histogram inspector shows exactly the histograms ``register`` computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from napari.utils._proxies import ReadOnlyWrapper  # what napari wraps vispy events in
from napari.utils.interactions import (
    mouse_move_callbacks,
    mouse_press_callbacks,
    mouse_release_callbacks,
)
from napari.utils.theme import get_theme

from napari_discreg import load_model, register
from napari_discreg._widgets import HistogramInspectorWidget, RegisterWidget
from napari_discreg.core.learning.discrepancy import l1, projected_emd


def _registered(viewer, pair, model_path, wait_job, **kwargs):
    viewer.add_image(pair.fixed, name="fixed", **kwargs)
    viewer.add_image(pair.moving, name="moving", **kwargs)
    widget = RegisterWidget(viewer)
    widget.load_checkpoint(model_path)
    wait_job(widget.run())
    return widget


def test_inspect_shows_the_registration_histograms(viewer, tiny_model_path, small_pair, wait_job):
    _registered(viewer, small_pair, tiny_model_path, wait_job)
    inspector = HistogramInspectorWidget(viewer)
    assert inspector.inspect(41.0, 58.0)
    expected = register(
        small_pair.fixed, small_pair.moving, model=load_model(tiny_model_path, "cpu")
    )
    i, j = expected.control_point(41.0, 58.0)
    p1, p2 = expected.probabilities[0, i, j], expected.probabilities[1, i, j]
    h, v = inspector.last_histograms, inspector.last_values
    np.testing.assert_allclose(h["f1"], p1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h["f2"], p2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h["rows_f1"], p1.sum(1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h["cols_f2"], p2.sum(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h["cdf_cols_f1"], np.cumsum(p1.sum(0)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h["offsets"], expected.offsets)
    assert v["control_point"] == (i, j)
    t1, t2 = torch.from_numpy(p1)[None], torch.from_numpy(p2)[None]
    np.testing.assert_allclose(v["pemd"], float(projected_emd(t1, t2)), rtol=1e-5)
    np.testing.assert_allclose(v["pemd"], expected.discrepancy[i, j], rtol=1e-4)
    np.testing.assert_allclose(v["l1"], float(l1(t1, t2)), rtol=1e-5)
    # pEMD of the marginals is the mean of the two 1D EMDs drawn as areas
    np.testing.assert_allclose(v["pemd"], 0.5 * (v["emd_rows"] + v["emd_cols"]), rtol=1e-5)
    assert v["swd"] >= 0.0
    # the marker sits on the inspected control point
    marker = viewer.layers["inspected point"]
    np.testing.assert_allclose(marker.data[0], expected.control_point_position(i, j))
    # the figure has the two histograms, two marginals and two cumulative plots (+ colorbar)
    assert len(inspector.figure.axes) >= 6
    titles = [ax.get_title() for ax in inspector.figure.axes]
    assert "head F1" in titles and "head F2" in titles
    assert inspector.figure.axes[0].get_xlabel() == "column displacement (px)"
    assert inspector.figure.axes[0].get_ylabel() == "row displacement (px)"


@dataclass
class MouseEvent:
    """What napari's mouse callbacks read from a vispy mouse event."""

    type: str
    position: tuple
    is_dragging: bool = False
    modifiers: tuple = ()
    button: int = 1
    dims_displayed: tuple = (0, 1)
    view_direction: tuple | None = None
    handled: bool = False


def test_click_inspects_the_point_under_the_mouse(viewer, tiny_model_path, small_pair, wait_job):
    # scaled and shifted layers: the click (world) is mapped into the fixed layer's pixels
    _registered(
        viewer, small_pair, tiny_model_path, wait_job, scale=(2.0, 2.0), translate=(5.0, 5.0)
    )
    inspector = HistogramInspectorWidget(viewer)
    world = (5.0 + 2.0 * 20.0, 5.0 + 2.0 * 70.0)  # pixel (20, 70)
    # napari wraps vispy events so that drag generators see the latest one
    mouse_press_callbacks(viewer, ReadOnlyWrapper(MouseEvent(type="mouse_press", position=world)))
    mouse_release_callbacks(viewer, MouseEvent(type="mouse_release", position=world))
    assert inspector.last_values["control_point"] == (20 // 4, 70 // 4)
    # a drag (panning) does not inspect
    before = inspector.last_values["control_point"]
    mouse_press_callbacks(
        viewer, ReadOnlyWrapper(MouseEvent(type="mouse_press", position=(15.0, 15.0)))
    )
    mouse_move_callbacks(
        viewer, MouseEvent(type="mouse_move", position=(25.0, 25.0), is_dragging=True)
    )
    mouse_release_callbacks(viewer, MouseEvent(type="mouse_release", position=(25.0, 25.0)))
    assert inspector.last_values["control_point"] == before
    inspector.close()
    assert inspector._on_mouse_drag not in viewer.mouse_drag_callbacks


def test_inspector_follows_the_napari_theme(viewer):
    inspector = HistogramInspectorWidget(viewer)
    viewer.theme = "light"
    light = get_theme("light").background.as_hex()
    import matplotlib.colors as mcolors

    assert mcolors.to_hex(inspector.figure.get_facecolor()) == mcolors.to_hex(light)
    viewer.theme = "dark"
    dark = get_theme("dark").background.as_hex()
    assert mcolors.to_hex(inspector.figure.get_facecolor()) == mcolors.to_hex(dark)
