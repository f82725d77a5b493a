"""Small Qt helpers and words shared by the widgets (so that no widget imports another)."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QHBoxLayout, QScrollArea, QVBoxLayout, QWidget

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
