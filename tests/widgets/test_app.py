"""The viewer that `bash scripts/run.sh` opens on a machine with a screen."""

from napari_discreg._app import WIDGETS, make_viewer


def test_app_opens_sample_and_docks_all_widgets(qtbot):
    viewer = make_viewer(show=False)
    try:
        names = [layer.name for layer in viewer.layers]
        assert "fixed (T1)" in names and "moving (T2-like)" in names
        docks = list(viewer.window._dock_widgets)
        for widget in WIDGETS:
            assert any(d.startswith(widget) for d in docks), (widget, docks)
    finally:
        viewer.close()
