"""Take the screenshots of docs/usage.md with a real napari window.

Run under a display, e.g. headless::

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python scripts/screenshots.py

It opens the real histology sample pair and registers it, then the multimodal sample pair, registers it with the Register widget (the default
method), shows the review view's modes and the field, inspects a control point with the
histogram inspector, opens the adaptation target set and runs a few adaptation steps, and
saves after each stage a screenshot of the whole window and one of the widget to
``docs/images/`` (``--out``):

=============================  ==============================================
file                           shows
=============================  ==============================================
``histology.png``              viewer after Register on the real stain pair
                               (RGB, different sizes, landmarks: the TRE in the
                               status line), checkerboard review
``register.png``               viewer after Register: the checkerboard of the
                               warped and the fixed image (the default review)
``register_widget.png``        the Register widget
``review_checkerboard.png``    viewer: the checkerboard review view
``review_difference.png``      viewer: the difference review view
``field.png``                  viewer: arrows and deformation grid shown
``discrepancy.png``            viewer: the discrepancy map over the fixed image
``inspector.png``              viewer with the histogram inspector docked
``inspector_widget.png``       the histogram inspector
``adaptation.png``             viewer with the adaptation widget docked
``adaptation_widget.png``      the adaptation widget after a few steps
=============================  ==============================================

``--model`` takes a checkpoint instead of the shipped pretrained model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="output folder")
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: shipped model)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="adaptation iterations (default: the method's)"
    )
    parser.add_argument(
        "--size", type=int, nargs=2, default=(1366, 768), help="window width height"
    )
    return parser.parse_args(argv)


def process_events(seconds: float = 0.3) -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def wait_for(job, timeout: float = 1800.0, what: str = "job") -> None:
    if job is None:
        raise SystemExit(f"the {what} did not start (see the notification above)")
    end = time.monotonic() + timeout
    while job.is_running:
        if time.monotonic() > end:
            job.stop_and_wait()
            raise SystemExit(f"the {what} took longer than {timeout:.0f} s")
        process_events(0.1)
    process_events(0.5)


def save_window(viewer, path: Path) -> None:
    process_events(0.5)
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def save_widget(widget, path: Path) -> None:
    process_events(0.3)
    if not widget.grab().save(str(path)):
        raise SystemExit(f"could not write {path}")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        print("no display: run with xvfb-run (see the module docstring)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)

    import napari

    from napari_discreg import load_model
    from napari_discreg._widgets import state_for
    from napari_discreg._widgets._register_outputs import (
        DISCREPANCY,
        DISPLACEMENT,
        GRID,
        output_name,
    )

    viewer = napari.Viewer(title="napari-discreg", show=True)
    viewer.window.resize(*args.size)
    _, register = viewer.window.add_plugin_dock_widget("napari-discreg", "Register")
    if args.model is not None and not register.load_checkpoint(args.model):
        return 1

    # stage 0: the real stain pair as it comes (RGB, other sizes, landmarks)
    viewer.open_sample("napari-discreg", "histology_pair")
    register.fixed_combo.set_layer(viewer.layers["fixed (HE)"])
    register.moving_combo.set_layer(viewer.layers["moving (proSPC)"])
    wait_for(register.run(), what="registration of the histology pair")
    viewer.reset_view()
    save_window(viewer, args.out / "histology.png")
    viewer.layers.clear()

    viewer.open_sample("napari-discreg", "multimodal_pair")
    register.fixed_combo.set_layer(viewer.layers["fixed (T1)"])
    register.moving_combo.set_layer(viewer.layers["moving (T2-like)"])
    wait_for(register.run(), what="registration")
    state = state_for(viewer)
    if state.run is None:
        print("registration failed (see the notification above)", file=sys.stderr)
        return 1
    run = state.run

    def out(role: str):
        return viewer.layers[output_name(run, role)]

    # stage 1: the registration result as it first appears (checkerboard review view)
    viewer.reset_view()
    save_window(viewer, args.out / "register.png")
    save_widget(register, args.out / "register_widget.png")
    for mode in ("checkerboard", "difference"):
        register.set_review_mode(mode)
        save_window(viewer, args.out / f"review_{mode}.png")
    register.set_review_mode("checkerboard")
    register.show_checks[DISPLACEMENT].setChecked(True)
    register.show_checks[GRID].setChecked(True)
    save_window(viewer, args.out / "field.png")
    register.show_checks[DISPLACEMENT].setChecked(False)
    register.show_checks[GRID].setChecked(False)
    register.show_checks[DISCREPANCY].setChecked(True)
    out("warped").visible = False
    save_window(viewer, args.out / "discrepancy.png")
    register.show_checks[DISCREPANCY].setChecked(False)
    out("warped").visible = True

    layers = viewer.layers
    # stage 2: inspect the brain control point where the heads disagree most
    _, inspector = viewer.window.add_plugin_dock_widget(
        "napari-discreg", "Histogram inspector", tabify=True
    )
    result = state.run.results[None]
    brain = layers["fixed tissue labels"].data > 0
    stride = result.stride
    h, w = result.discrepancy.shape
    inside = brain[: h * stride : stride, : w * stride : stride][:h, :w]
    disc = np.where(inside, result.discrepancy, -np.inf)
    i, j = np.unravel_index(int(np.argmax(disc)), disc.shape)
    row, col = result.control_point_position(i, j)
    inspector.inspect(row, col)
    save_window(viewer, args.out / "inspector.png")
    save_widget(inspector, args.out / "inspector_widget.png")

    # stage 3: the default adaptation of the paper-protocol mono model (a model with
    # something to learn: the shipped default one already matches these contrasts)
    viewer.open_sample("napari-discreg", "adaptation_target_set")
    _, adaptation = viewer.window.add_plugin_dock_widget(
        "napari-discreg", "Adaptation", tabify=True
    )
    state.set_model(load_model("mono", device="cpu"), "shipped mono")
    adaptation.fixed_combo.set_layer(layers["target fixed (T1)"])
    adaptation.moving_combo.set_layer(layers["target moving (T2-like)"])
    if args.steps is not None:
        adaptation.steps_spin.setValue(args.steps)
    for layer in layers:
        layer.visible = layer.name in ("target fixed (T1)", "target moving (T2-like)")
    layers["target moving (T2-like)"].opacity = 0.5
    wait_for(adaptation.start(), what="adaptation")
    save_window(viewer, args.out / "adaptation.png")
    save_widget(adaptation, args.out / "adaptation_widget.png")

    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
