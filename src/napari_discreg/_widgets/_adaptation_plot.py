"""The adaptation widget's live plot: the run's loss (self-training's pseudo-label
cross-entropy, or MCD's source cross-entropy and target discrepancy) and the criterion."""

from __future__ import annotations

import numpy as np

from ._mpl import FigureWidget


class AdaptationPlot(FigureWidget):
    """Live plot of an adaptation run: only draws, the base class owns figure and theme."""

    def __init__(self, napari_viewer, parent=None) -> None:
        self.iterations: list[int] = []
        self.source_ce: list[float] = []
        self.discrepancy: list[float] = []
        self.criterion: list[tuple[int, float]] = []
        self.best_iteration: int | None = None
        self.discrepancy_name = "pEMD"
        self.method = "self-training"
        super().__init__(
            napari_viewer,
            figsize=(5.0, 4.0),
            toolbar=False,
            min_height=220,
            caption=(
                "Top: self-training's cross-entropy against the refined fields' "
                "pseudo-labels (should fall); for MCD the source cross-entropy (should stay "
                "low) and the heads' discrepancy on the target pairs (should fall). Bottom: "
                "the keep-best criterion on the held-out target pairs (higher is better); "
                "the star is the iteration whose weights the run keeps."
            ),
            parent=parent,
        )

    def reset(self, discrepancy_name: str, method: str = "mcd") -> None:
        """Empty the plot for a new run of ``method`` (the artists stay: a rebuild costs
        0.1-0.3 s)."""
        self.iterations, self.source_ce, self.discrepancy, self.criterion = [], [], [], []
        self.best_iteration = None
        self.discrepancy_name = discrepancy_name
        self.method = method
        if getattr(self, "_axes", None) is None:
            self.refresh()
            return
        self._label_series()
        self.update_data()

    def _label_series(self) -> None:
        mcd = getattr(self, "method", "mcd") == "mcd"
        loss = "source cross-entropy" if mcd else "pseudo-label cross-entropy"
        self._source_line.set_label("source CE" if mcd else "pseudo-label CE")
        self._axes[0].set_ylabel(loss, color=self.theme.series[0], fontsize=8)
        name = f"target {self.discrepancy_name}" if mcd else ""
        self._disc_line.set_label(name or "_none")
        self._axes[1].set_ylabel(name, color=self.theme.series[1], fontsize=8)
        self._axes[1].set_visible(mcd)  # self-training has no discrepancy to show

    def add(self, record) -> None:
        if record.iteration > 0 and record.losses:
            self.iterations.append(record.iteration)
            loss = record.losses.get("source_ce", record.losses.get("pseudo_label_ce", np.nan))
            self.source_ce.append(float(loss))
            self.discrepancy.append(
                float(record.discrepancy) if record.discrepancy is not None else np.nan
            )
        if record.criterion is not None:
            self.criterion.append((record.iteration, float(record.criterion)))
        self.best_iteration = record.best_iteration

    def draw(self) -> None:
        """Build the axes and the line artists (on reset and theme changes); the data
        go in through :meth:`update_data`."""
        c1, c2 = self.theme.series
        ax1, ax3 = self.figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
        (self._source_line,) = ax1.plot([], [], color=c1, label="source CE")
        ax1.set_ylabel("source cross-entropy", color=c1, fontsize=8)
        ax2 = ax1.twinx()
        (self._disc_line,) = ax2.plot([], [], color=c2, label=f"target {self.discrepancy_name}")
        ax2.set_ylabel(f"target {self.discrepancy_name}", color=c2, fontsize=8)
        ax1.set_title("adaptation", fontsize=9)
        (self._crit_line,) = ax3.plot(
            [], [], "o-", color=self.theme.text, ms=4, label="keep-best criterion"
        )
        (self._best_marker,) = ax3.plot([], [], "*", color="#ffd54f", ms=12, label="best")
        ax3.legend(fontsize=7, loc="lower right")
        ax3.set_ylabel("keep-best criterion", fontsize=8)
        ax3.set_xlabel("iteration", fontsize=8)
        for ax in (ax1, ax2, ax3):
            ax.tick_params(labelsize=7)
        self._axes = (ax1, ax2, ax3)
        self._label_series()
        self._set_data()

    def _set_data(self) -> None:
        self._source_line.set_data(self.iterations, self.source_ce)
        self._disc_line.set_data(self.iterations, self.discrepancy)
        it = [i for i, _ in self.criterion]
        score = [v for _, v in self.criterion]
        self._crit_line.set_data(it, score)
        best = [(i, v) for i, v in self.criterion if i == self.best_iteration]
        self._best_marker.set_data([i for i, _ in best], [v for _, v in best])
        for ax in self._axes:
            ax.relim()
            ax.autoscale_view()

    def update_data(self) -> None:
        """Show the records added since the last draw: new data on the same artists, in
        the layout of the last full draw (a redraw costs a third of a rebuild, so the
        event loop stays responsive during a run)."""
        if self.figure.get_layout_engine() is not None:
            # keep the axes where the constrained layout put them: it is the costly part
            self.figure.set_layout_engine("none")
        self._set_data()
        self.canvas.draw_idle()

    def refresh(self) -> None:
        self.figure.set_layout_engine("constrained")  # a full rebuild lays out again
        super().refresh()

    def apply_theme(self) -> None:
        super().apply_theme()
        # keep the series colours on the twin axes' labels
        axes = self.figure.axes
        if len(axes) >= 3:
            axes[0].yaxis.label.set_color(self.theme.series[0])
            axes[2].yaxis.label.set_color(self.theme.series[1])
