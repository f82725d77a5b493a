"""Histogram inspector: click a pixel, see what both heads believe about its displacement.

For the control point under the click it draws, for heads F1 and F2, the K x K
displacement histogram, the row and column marginals and their cumulative sums (the
area between two cumulative sums is the 1D Earth Mover's distance that the projected
EMD averages), and the pEMD, L1 and sliced-Wasserstein discrepancies of that point;
the numbers come from :func:`napari_discreg.core.registration.histograms.point_summary`.
"""

from __future__ import annotations

import time

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QLabel

from ..core.registration.geometry import in_plane_axes, insert_axis, sample_field
from ..core.registration.histograms import HISTOGRAM_KEYS, point_summary
from . import _notify
from ._layers import META_KEY, is_output, upsert_layer
from ._mpl import FigureWidget
from ._qt import tabbed_panel
from ._state import state_for

MARKER_LAYER = "inspected point"
ROW_LABEL = "row displacement (px)"
COL_LABEL = "column displacement (px)"
#: "zoom to the mass" leaves out at most this share of each head's mass on each side
#: of each axis (the rest of the K x K labels hold next to nothing)
MASS_TAIL = 0.005
#: opacity of the EMD shading (with the theme's ``shade`` colour: a contrast ratio of
#: 2.4-2.8 to the background in both napari themes, against 1.3-1.6 for the highlight grey)
SHADE_ALPHA = 0.5


def mass_window(
    histograms: dict, marks=(), *, tail: float = MASS_TAIL, pad: int = 1, min_bins: int = 5
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The displacements (px, bin edges) that hold the probability: ``((row_lo, row_hi),
    (col_lo, col_hi))``.

    Per axis, the union over both heads of the bins between the ``tail`` and ``1 - tail``
    quantiles of the marginal, with the ``marks`` (e.g. the expected and the true
    displacement, (row, col) in px), ``pad`` bins more on each side and at least
    ``min_bins`` bins; never beyond the K labels.
    """
    off = np.asarray(histograms["offsets"], dtype=float)
    k = len(off)
    d = float(off[1] - off[0]) if k > 1 else 1.0
    windows = []
    for axis, kind in enumerate(("rows", "cols")):
        lo, hi = k - 1, 0
        for head in ("f1", "f2"):
            cdf = np.asarray(histograms[f"cdf_{kind}_{head}"], dtype=float)
            cdf = cdf / cdf[-1] if cdf[-1] > 0 else np.linspace(0.0, 1.0, k)
            lo = min(lo, int(np.searchsorted(cdf, tail, side="right")))
            hi = max(hi, min(int(np.searchsorted(cdf, 1.0 - tail, side="left")), k - 1))
        for mark in marks:
            index = int(np.clip(np.round((float(mark[axis]) - off[0]) / d), 0, k - 1))
            lo, hi = min(lo, index), max(hi, index)
        lo, hi = max(min(lo, hi) - pad, 0), min(max(lo, hi) + pad, k - 1)
        while hi - lo + 1 < min(min_bins, k):
            lo, hi = max(lo - 1, 0), min(hi + 1, k - 1)
        windows.append((float(off[lo] - d / 2), float(off[hi] + d / 2)))
    return windows[0], windows[1]


class HistogramInspectorWidget(FigureWidget):
    """Per-control-point view of the two heads' displacement histograms.

    Attributes
    ----------
    last_histograms : dict of str to ndarray
        What was drawn last: ``"f1"``, ``"f2"`` (K, K); ``"rows_f1"``, ``"rows_f2"``,
        ``"cols_f1"``, ``"cols_f2"`` (K,) marginals; ``"cdf_rows_f1"`` ... cumulative
        sums; ``"offsets"`` (K,) bin positions in pixels.
    last_values : dict
        The numbers drawn: ``"pemd"``, ``"l1"``, ``"swd"``, ``"emd_rows"``, ``"emd_cols"``
        (bins), ``"control_point"`` (i, j), ``"position"`` (row, col) of the control point
        in pixels, ``"slice"``, ``"expected_f1"``/``"expected_f2"``/``"expected"``
        (row, col) displacement in pixels and ``"true_displacement"`` when the moving
        layer's metadata holds one.
    """

    def __init__(self, napari_viewer, parent=None) -> None:
        self.last_histograms: dict[str, np.ndarray] = {}
        self.last_values: dict = {}
        #: the axes' limits drawn last (px): ``{"rows": (lo, hi), "cols": (lo, hi)}``
        self.last_limits: dict[str, tuple[float, float]] = {}
        self._query: tuple | None = None
        self._last_hover = 0.0
        super().__init__(
            napari_viewer,
            figsize=(5.0, 8.0),
            min_height=520,
            scroll=True,
            caption=(
                "Top: each head's probability over the K x K displacements of the control "
                "point (+ its expected displacement, x the true one when known). Middle: the "
                "row and column marginals (the 1D projections). Bottom: their cumulative "
                "sums; the shaded area between the heads is the EMD, summed as pEMD."
            ),
            parent=parent,
        )
        self.state = state_for(self.viewer)

        self.pick_check = QCheckBox("inspect on click")
        self.pick_check.setChecked(True)
        self.pick_check.setToolTip(
            "Click (without dragging) on the image to inspect that control point"
        )
        self.hover_check = QCheckBox("follow the mouse")
        self.hover_check.setToolTip("Inspect the control point under the mouse while it moves")
        self.zoom_check = QCheckBox("zoom to the mass")
        self.zoom_check.setChecked(True)
        self.zoom_check.setToolTip(
            "Show the displacements that hold the probability of either head (the mass "
            "often fills a few of the K x K labels); off: the full range of the labels"
        )
        self.info_label = QLabel("Register an image pair, then click on it (without dragging).")
        self.info_label.setWordWrap(True)
        controls = QHBoxLayout()
        controls.addWidget(self.pick_check)
        controls.addWidget(self.hover_check)
        controls.addWidget(self.zoom_check)
        controls.addStretch(1)
        self.layout().insertLayout(0, controls)
        self.layout().insertWidget(1, self.info_label)

        self.viewer.mouse_drag_callbacks.append(self._on_mouse_drag)
        self.viewer.mouse_move_callbacks.append(self._on_mouse_move)
        self.state.run_changed.connect(self._on_run_changed)
        self.zoom_check.toggled.connect(lambda *_: self.refresh())
        self._docked = False
        tabbed_panel(self)

    # ------------------------------------------------------------------ events
    def _on_mouse_drag(self, viewer, event):
        """Inspect on a click; a drag (panning) does not inspect."""
        if not self.pick_check.isChecked() or self.state.run is None:
            return
        start = tuple(event.position)
        dragged = False
        yield
        while event.type == "mouse_move":
            dragged = True
            yield
        if not dragged:
            self.inspect_world(start, quiet=True)

    def _on_mouse_move(self, viewer, event):
        if not self.hover_check.isChecked() or self.state.run is None:
            return
        now = time.monotonic()
        if now - self._last_hover < 0.1:  # at most ten redraws a second
            return
        self._last_hover = now
        self.inspect_world(tuple(event.position), quiet=True)

    def _on_run_changed(self) -> None:
        if self._query is not None and self.state.run is not None:
            row, col, index = self._query
            if self.state.run.result_for(index) is not None:
                self.inspect(row, col, index)
                return
        self.last_histograms, self.last_values = {}, {}
        self.refresh()

    # ------------------------------------------------------------------ inspection
    def inspect_world(self, position, *, quiet: bool = False) -> bool:
        """Inspect the control point at a world position (e.g. a mouse click)."""
        run = self.state.run
        fixed = run.layer("fixed") if run is not None else None
        if fixed is None:
            if not quiet:
                _notify.warning("register an image pair first")
            return False
        coords = np.asarray(fixed.world_to_data(position), dtype=float)
        shape = fixed.data.shape
        if np.any(coords < -0.5) or np.any(coords > np.asarray(shape) - 0.5):
            return False  # outside the image
        plane = in_plane_axes(fixed.ndim, run.axis)
        index = None if run.axis is None else int(np.round(coords[run.axis]))
        return self.inspect(coords[plane[0]], coords[plane[1]], index, quiet=quiet)

    def inspect(
        self, row: float, col: float, slice_index: int | None = None, *, quiet: bool = False
    ) -> bool:
        """Draw the histograms of the control point that holds pixel ``(row, col)``.

        ``slice_index`` picks the slice of a 3D registration (default: the registered
        slice when there is only one). Returns False (after a notification unless
        ``quiet``) when there is nothing to inspect.
        """
        run = self.state.run
        if run is None:
            if not quiet:
                _notify.warning("register an image pair first: there is nothing to inspect")
            return False
        result = run.result_for(slice_index)
        if result is None:
            if not quiet:
                if not run.results:
                    _notify.warning("a field loaded from a file has no histograms to inspect")
                else:
                    _notify.warning(f"slice {slice_index} was not registered")
            return False
        if slice_index is None and run.axis is not None:
            slice_index = next(iter(run.results))
        i, j = result.control_point(row, col)
        summary = point_summary(result.probabilities[:, i, j], result.offsets)
        position = result.control_point_position(i, j)
        values = {k: v for k, v in summary.items() if k not in HISTOGRAM_KEYS}
        values.update(
            control_point=(i, j),
            position=(float(position[0]), float(position[1])),
            slice=slice_index,
            discrepancy_map=float(result.discrepancy[i, j]),
            model=run.model_name,
        )
        truth = self._true_displacement(run, slice_index, position)
        if truth is not None:
            values["true_displacement"] = truth
        self.last_values = values
        self.last_histograms = {k: summary[k] for k in HISTOGRAM_KEYS}
        self._query = (float(row), float(col), slice_index)
        self._update_marker(run, position, slice_index, result.stride)
        self.info_label.setText(
            f"model: {run.model_name}; pEMD per control point is the 'discrepancy' layer"
        )
        self.refresh()
        return True

    @staticmethod
    def _true_displacement(run, index, position) -> tuple[float, float] | None:
        moving = run.layer("moving")
        truth = None if moving is None else moving.metadata.get("true_displacement")
        if truth is None:
            return None
        truth = np.asarray(truth)
        if truth.ndim == 4 and index is not None and index < truth.shape[0]:
            truth = truth[index]
        if truth.ndim != 3 or truth.shape[0] != 2:
            return None
        value = sample_field(truth, np.asarray([position]))[0]
        return float(value[0]), float(value[1])

    def _update_marker(self, run, position, index, stride) -> None:
        fixed = run.layer("fixed")
        if fixed is None:
            return
        point = insert_axis(
            np.asarray([position], dtype=float), run.axis, index if index is not None else 0
        )
        active = self.viewer.layers.selection.active
        upsert_layer(
            self.viewer,
            MARKER_LAYER,
            "points",
            point,
            scale=np.asarray(fixed.scale),
            translate=np.asarray(fixed.translate),
            symbol="cross",
            size=float(max(1.5 * stride, 4)),
            face_color="red",
            border_color="white",
            metadata={META_KEY: {"output": MARKER_LAYER}},  # never offered as an input
        )
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active  # keep the user's selection

    # ------------------------------------------------------------------ drawing
    def draw(self) -> None:
        h = self.last_histograms
        self.last_limits = {}
        if not h:
            ax = self.figure.add_subplot(1, 1, 1)
            ax.set_axis_off()
            ax.text(
                0.5,
                0.5,
                "Register an image pair, then click on the image\nto inspect a control point.",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            return
        v = self.last_values
        c1, c2 = self.theme.series
        off = h["offsets"]
        d = float(off[1] - off[0]) if len(off) > 1 else 1.0
        full = (float(off[0] - d / 2), float(off[-1] + d / 2))
        extent = (full[0], full[1], full[1], full[0])
        vmax = float(max(h["f1"].max(), h["f2"].max(), 1e-6))
        # one row per kind of plot; the right column shares the left one's y axis, so a
        # y label is written once (on the left) and never runs into the colour bar
        axes = self.figure.subplots(3, 2, sharey="row")
        marks = [v["expected_f1"], v["expected_f2"]]
        for ax, key, name, expected in (
            (axes[0, 0], "f1", "head F1", v["expected_f1"]),
            (axes[0, 1], "f2", "head F2", v["expected_f2"]),
        ):
            im = ax.imshow(h[key], extent=extent, origin="upper", cmap="viridis", vmin=0, vmax=vmax)
            ax.plot(expected[1], expected[0], "+", color="white", ms=10, mew=2)
            if "true_displacement" in v:
                t = v["true_displacement"]
                ax.plot(t[1], t[0], "x", color="#ff5252", ms=8, mew=2)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(COL_LABEL, fontsize=8)
        if "true_displacement" in v:
            marks.append(v["true_displacement"])
        axes[0, 0].set_ylabel(ROW_LABEL, fontsize=8)
        self.figure.colorbar(im, ax=list(axes[0]), shrink=0.8).set_label("probability", size=8)
        for ax, kind, label in ((axes[1, 0], "rows", ROW_LABEL), (axes[1, 1], "cols", COL_LABEL)):
            ax.step(off, h[f"{kind}_f1"], where="mid", color=c1)
            ax.step(off, h[f"{kind}_f2"], where="mid", color=c2)
            ax.set_xlabel(label, fontsize=8)
            ax.set_title(f"{'row' if kind == 'rows' else 'column'} marginal", fontsize=9)
        axes[1, 0].set_ylabel("probability", fontsize=8)
        for ax, kind, label in ((axes[2, 0], "rows", ROW_LABEL), (axes[2, 1], "cols", COL_LABEL)):
            a, b = h[f"cdf_{kind}_f1"], h[f"cdf_{kind}_f2"]
            ax.step(off, a, where="mid", color=c1)
            ax.step(off, b, where="mid", color=c2)
            ax.fill_between(off, a, b, step="mid", color=self.theme.shade, alpha=SHADE_ALPHA, lw=0)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(label, fontsize=8)
            emd = v["emd_rows" if kind == "rows" else "emd_cols"]
            ax.set_title(f"cumulative (EMD {emd:.3f})", fontsize=9)
        axes[2, 0].set_ylabel("cumulative", fontsize=8)
        for ax in axes.ravel():
            ax.tick_params(labelsize=7)
            ax.yaxis.set_tick_params(labelleft=True)
        # what the limits are: zoomed to the mass (default) or the full label range
        rows, cols = mass_window(h, marks) if self.zoom_check.isChecked() else (full, full)
        self.last_limits = {"rows": rows, "cols": cols}
        for ax in axes[0]:
            ax.set_xlim(*cols)
            ax.set_ylim(rows[1], rows[0])  # rows grow downwards, as in the image
        for ax in (axes[1, 0], axes[2, 0]):
            ax.set_xlim(*rows)
        for ax in (axes[1, 1], axes[2, 1]):
            ax.set_xlim(*cols)
        # one legend for every plot, below them: never over the data
        handles = [
            Line2D([], [], ls="none", marker="+", ms=8, mew=2, color=self.theme.text),
            Line2D([], [], color=c1),
            Line2D([], [], color=c2),
            Patch(facecolor=self.theme.shade, alpha=SHADE_ALPHA),
        ]
        labels = ["expected", "F1", "F2", "EMD (area)"]
        if "true_displacement" in v:
            handles.insert(1, Line2D([], [], ls="none", marker="x", ms=7, mew=2, color="#ff5252"))
            labels.insert(1, "truth")
        self.figure.legend(
            handles, labels, loc="outside lower center", ncols=len(labels), fontsize=7
        )
        i, j = v["control_point"]
        where = f"slice {v['slice']}, " if v.get("slice") is not None else ""
        self.figure.suptitle(
            f"control point ({i}, {j}), {where}pixel ({v['position'][0]:.1f}, {v['position'][1]:.1f})\n"
            f"pEMD {v['pemd']:.3f} bins   L1 {v['l1']:.3g}   SWD {v['swd']:.3g}",
            fontsize=9,
        )

    def apply_theme(self) -> None:
        super().apply_theme()
        t = self.theme
        if self.figure._suptitle is not None:
            self.figure._suptitle.set_color(t.text)
        for legend in self.figure.legends:
            legend.get_frame().set_facecolor(t.foreground)
            legend.get_frame().set_edgecolor(t.highlight)
            for text in legend.get_texts():
                text.set_color(t.text)

    # ------------------------------------------------------------------ lifecycle
    def event(self, event):
        if event.type() == QEvent.Type.ParentChange:
            if self.parentWidget() is not None:
                self._docked = True
            elif getattr(self, "_docked", False):
                # napari closes a panel (its x) by un-parenting it, without a close event
                self._docked = False
                self.shutdown()
        return super().event(event)

    def _remove_marker(self) -> None:
        """Remove the ``inspected point`` layer this widget added (when it closes)."""
        try:
            layers = self.viewer.layers
            layer = layers[MARKER_LAYER] if MARKER_LAYER in layers else None
            if layer is not None and is_output(layer):
                layers.remove(layer)
        except (KeyError, ValueError, RuntimeError):  # the viewer is closing
            pass

    def shutdown(self) -> None:
        """Remove the viewer callbacks and the marker layer (called when the widget closes)."""
        for callbacks, func in (
            (self.viewer.mouse_drag_callbacks, self._on_mouse_drag),
            (self.viewer.mouse_move_callbacks, self._on_mouse_move),
        ):
            if func in callbacks:
                callbacks.remove(func)
        try:
            self.state.run_changed.disconnect(self._on_run_changed)
        except (TypeError, ValueError, RuntimeError):
            pass
        self.disconnect_viewer()
        self._remove_marker()

    def closeEvent(self, event):  # noqa: N802 - Qt API
        self.shutdown()
        super().closeEvent(event)
