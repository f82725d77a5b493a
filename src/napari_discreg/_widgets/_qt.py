"""Small Qt helpers and words shared by the widgets (so that no widget imports another)."""

from __future__ import annotations

from qtpy.QtWidgets import QHBoxLayout

#: Words in the names of the layers the widgets add: layer pickers avoid preselecting them.
OUTPUT_WORDS = ("warped", "displacement", "discrepancy", "deformation", "inspected")


def row(*widgets) -> QHBoxLayout:
    """The widgets side by side in a margin-less horizontal layout."""
    layout = QHBoxLayout()
    layout.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        layout.addWidget(w)
    return layout
