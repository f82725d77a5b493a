"""Small Qt helpers and words shared by the widgets (so that no widget imports another)."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QDockWidget,
    QFrame,
    QHBoxLayout,
    QMainWindow,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

#: Qt property that marks the plugin's panels (see :func:`tabbed_panel`)
PANEL_PROPERTY = "napari_discreg_panel"

#: Words in the names of the layers the widgets add: layer pickers avoid preselecting them.
OUTPUT_WORDS = ("warped", "displacement", "discrepancy", "deformation", "inspected")


def select_data(combo, value, what: str, choices) -> None:
    """Select the entry of ``combo`` whose data is ``value``; ``ValueError`` naming
    ``what`` and the ``choices`` when there is none."""
    index = combo.findData(value)
    if index < 0:
        raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}")
    combo.setCurrentIndex(index)


def row(*widgets) -> QHBoxLayout:
    """The widgets side by side in a margin-less horizontal layout."""
    layout = QHBoxLayout()
    layout.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        layout.addWidget(w)
    return layout


class VerticalScrollArea(QScrollArea):
    """Scrolls vertically only and asks for the width its content needs (a plain
    QScrollArea asks for little, so a docked panel would clip its content on the right)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def _content_width(self, hint) -> int:
        return hint.width() + self.verticalScrollBar().sizeHint().width() + 2

    def minimumSizeHint(self):  # noqa: N802 - Qt API
        hint = super().minimumSizeHint()
        if self.widget() is not None:
            hint.setWidth(self._content_width(self.widget().minimumSizeHint()))
        return hint

    def sizeHint(self):  # noqa: N802 - Qt API
        hint = super().sizeHint()
        if self.widget() is not None:
            hint.setWidth(self._content_width(self.widget().sizeHint()))
        return hint


def scrolled_layout(owner: QWidget) -> tuple[QVBoxLayout, QVBoxLayout]:
    """Give ``owner`` a vertical scroll area: returns ``(content, footer)`` layouts.

    What goes into ``content`` scrolls when the panel is shorter than it (docked panels
    fit a 1366 x 768 screen); ``footer`` stays below the scroll area, always reachable
    (e.g. Keep / Revert / Save).
    """
    inner = QWidget()
    content = QVBoxLayout(inner)
    scroll = VerticalScrollArea()
    scroll.setWidget(inner)
    outer = QVBoxLayout(owner)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll, 1)
    footer = QVBoxLayout()
    footer.setContentsMargins(9, 0, 9, 9)
    outer.addLayout(footer)
    owner.scroll_area = scroll
    return content, footer


# ------------------------------------------------------------------ tabbed panels
# napari docks each panel opened from the Plugins menu below the others in the right
# area: three panels share 768 px and each keeps a 50-100 px scroll area. Panels of this
# plugin that land in the same area as another one join it as a tab instead (napari's
# own ``tabify=True``, whichever way the panel was opened); a panel dragged out later
# stays where the user put it.


def tabify_panel(widget: QWidget) -> bool:
    """Tab ``widget``'s dock with the last docked panel of this plugin in the same area of
    the main window (and raise it); True when it is in a tab group afterwards."""
    dock = widget.parentWidget()
    if not isinstance(dock, QDockWidget) or dock.isFloating():
        return False
    window = dock.parentWidget()
    if not isinstance(window, QMainWindow):
        return False
    if window.tabifiedDockWidgets(dock):
        return True  # napari tabified it already (``tabify=True``)
    area = window.dockWidgetArea(dock)
    others = [
        d
        for d in window.findChildren(QDockWidget)
        if d is not dock
        and not d.isFloating()
        and not d.isHidden()
        and window.dockWidgetArea(d) == area
        and d.widget() is not None
        and d.widget().property(PANEL_PROPERTY)
    ]
    if not others:
        return False
    window.tabifyDockWidget(others[-1], dock)
    dock.show()
    dock.raise_()  # the panel just opened is the tab shown
    return True


class _Tabifier(QObject):
    """Event filter on a panel: once it is docked (a parent change; napari adds the dock
    to the window in the same call), tab it with the plugin's other panels."""

    def __init__(self, panel: QWidget) -> None:
        super().__init__(panel)
        self._panel = panel
        self.tabbed = False

    def eventFilter(self, obj, event):  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.ParentChange and not self.tabbed:
            QTimer.singleShot(0, self._tabify)
        return False

    def _tabify(self) -> None:
        try:
            self.tabbed = tabify_panel(self._panel)
        except RuntimeError:  # the panel was deleted before the event loop came back
            pass


def tabbed_panel(widget: QWidget) -> None:
    """Mark ``widget`` as a panel of this plugin: docked in napari's window in an area
    that holds another of them, it joins that one as a tab."""
    widget.setProperty(PANEL_PROPERTY, True)
    widget._tabifier = _Tabifier(widget)
    widget.installEventFilter(widget._tabifier)
