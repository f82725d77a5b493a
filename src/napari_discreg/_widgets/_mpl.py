"""One base widget that owns a matplotlib figure themed like napari (napari-matplotlib's design).

:class:`FigureWidget` creates the figure, the Qt canvas and a navigation toolbar,
follows the viewer's theme (``napari.utils.theme.get_theme(viewer.theme)``) and
redraws on theme changes. Subclasses only implement :meth:`FigureWidget.draw`,
which fills ``self.figure`` from scratch; :meth:`FigureWidget.refresh` clears the
figure, calls ``draw`` and themes every axes.
"""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg, NavigationToolbar2QT
from matplotlib.figure import Figure
from napari.utils.theme import get_theme
from qtpy.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

from ._qt import VerticalScrollArea
from ._state import unwrap_viewer


@dataclass(frozen=True)
class FigureTheme:
    """Colours of a napari theme as matplotlib colour strings."""

    background: str
    foreground: str
    text: str
    highlight: str
    primary: str
    series: tuple[str, str] = ("#4fc3f7", "#ffb74d")  # head F1, head F2
    #: a third colour for areas between the series (the inspector's EMD shading): it must
    #: stand out of the background in both themes, which napari's highlight grey did not
    shade: str = "#f48fb1"

    @classmethod
    def from_napari(cls, theme_id: str) -> FigureTheme:
        try:
            theme = get_theme(theme_id)
        except (KeyError, ValueError):
            theme = get_theme("dark")

        def hexa(c) -> str:
            return c.as_hex() if hasattr(c, "as_hex") else str(c)

        dark = getattr(theme, "type", "dark") == "dark"
        return cls(
            background=hexa(theme.background),
            foreground=hexa(theme.foreground),
            text=hexa(theme.text),
            highlight=hexa(theme.highlight),
            primary=hexa(theme.primary),
            series=("#4fc3f7", "#ffb74d") if dark else ("#1565c0", "#e65100"),
            shade="#f48fb1" if dark else "#ad1457",
        )


class _Canvas(FigureCanvasQTAgg):
    """A canvas whose queued redraw survives the widget being closed first.

    ``draw_idle`` queues a zero-delay Qt timer; when the dock (or the viewer) is closed
    while it runs, the draw ends in ``update()`` on a deleted C++ object and matplotlib
    prints that RuntimeError's traceback. There is nothing left to show then, so the
    error is dropped.
    """

    def draw(self) -> None:
        try:
            super().draw()
        except RuntimeError as exc:
            if "has been deleted" not in str(exc):
                raise


class FigureWidget(QWidget):
    """Base of the plotting widgets: owns the figure, the canvas and the theme."""

    def __init__(
        self,
        napari_viewer,
        *,
        figsize=(5.0, 6.0),
        toolbar: bool = True,
        min_height: int | None = None,
        caption: str = "",
        scroll: bool = False,
        parent=None,
    ):
        super().__init__(parent)
        self.viewer = unwrap_viewer(napari_viewer)
        self.figure = Figure(figsize=figsize, layout="constrained")
        self.canvas = _Canvas(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        # small enough to fit a 1366 x 768 screen beside the other panels; grows when it can
        self.canvas.setMinimumHeight(min_height or int(figsize[1] * 50))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.toolbar = NavigationToolbar2QT(self.canvas, self) if toolbar else None
        if self.toolbar is not None:
            layout.addWidget(self.toolbar)
        self.caption_label = QLabel(caption)  # what am I looking at
        self.caption_label.setWordWrap(True)
        self.caption_label.setVisible(bool(caption))
        if scroll:
            # a tall figure scrolls inside a short panel (three docked panels on a
            # 1366 x 768 screen) instead of making the window taller than the screen
            body = QWidget()
            inner = QVBoxLayout(body)
            inner.setContentsMargins(0, 0, 0, 0)
            inner.addWidget(self.canvas)
            inner.addWidget(self.caption_label)
            area = VerticalScrollArea()
            area.setWidget(body)
            area.setMinimumHeight(120)
            layout.addWidget(area, 1)
            self.scroll_area = area
        else:
            layout.addWidget(self.canvas)
            layout.addWidget(self.caption_label)
        self.theme = FigureTheme.from_napari(self.viewer.theme)
        self.viewer.events.theme.connect(self._on_theme_changed)
        self.refresh()

    # ----------------------------------------------------------- for subclasses
    def draw(self) -> None:
        """Fill ``self.figure`` (already cleared). Subclasses override this."""

    # ----------------------------------------------------------- machinery
    def refresh(self) -> None:
        """Clear the figure, draw it again and apply the napari theme."""
        self.figure.clear()
        self.draw()
        self.apply_theme()
        self.canvas.draw_idle()

    def apply_theme(self) -> None:
        t = self.theme
        self.figure.patch.set_facecolor(t.background)
        for text in self.figure.texts:
            text.set_color(t.text)
        for ax in self.figure.axes:
            ax.set_facecolor(t.background)
            for spine in ax.spines.values():
                spine.set_color(t.text)
            ax.tick_params(colors=t.text, which="both")
            ax.xaxis.label.set_color(t.text)
            ax.yaxis.label.set_color(t.text)
            ax.title.set_color(t.text)
            legend = ax.get_legend()
            if legend is not None:
                legend.get_frame().set_facecolor(t.foreground)
                legend.get_frame().set_edgecolor(t.highlight)
                for text in legend.get_texts():
                    text.set_color(t.text)
            for text in ax.texts:
                if getattr(text, "_discreg_keep_color", False):
                    continue
                text.set_color(t.text)

    def _on_theme_changed(self, event=None) -> None:
        self.theme = FigureTheme.from_napari(self.viewer.theme)
        self.refresh()

    def disconnect_viewer(self) -> None:
        try:
            self.viewer.events.theme.disconnect(self._on_theme_changed)
        except (TypeError, ValueError, RuntimeError):
            pass
