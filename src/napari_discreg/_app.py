"""``python -m napari_discreg._app``: napari with the plugin's widgets and the sample pair.

This is what ``bash scripts/run.sh`` opens on a machine with a screen.
"""

from __future__ import annotations

import napari

PLUGIN = "napari-discreg"
WIDGETS = ("Register", "Histogram inspector", "Adaptation")


def make_viewer(*, show: bool = True) -> napari.Viewer:
    """A viewer with the sample multimodal pair loaded and the three widgets docked."""
    viewer = napari.Viewer(title="napari-discreg", show=show)
    viewer.open_sample(PLUGIN, "multimodal_pair")
    for name in WIDGETS:
        # the adaptation widget shares a tabbed dock with the inspector, so the canvas keeps room
        viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=name == "Adaptation")
    return viewer


def main() -> None:
    make_viewer()
    napari.run()


if __name__ == "__main__":
    main()
