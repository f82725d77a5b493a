"""How long the napari event loop is blocked while the plugin works (GUI responsiveness).

    python benchmarks/gui_latency.py [--repeats 3] [--adapt-steps 4] [--quick]

Opens a real napari viewer (on a virtual 1366 x 768 screen: the script restarts itself
under ``xvfb-run`` when there is no display), loads the sample pair, docks the three
widgets as ``bash scripts/run.sh`` does and clicks their buttons. A ``QTimer`` ticks every
50 ms; a tick that comes late means the GUI thread was busy (or a worker held the GIL)
for that long. For every action the table gives the worst and the 99th-percentile
lateness over the whole job (from the click until its results are shown), the job's
wall-clock time and the time from *Stop* to the job's end. Writes the "gui-latency"
section of docs/benchmarks.md.

A benchmark, not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
TICK_MS = 50
SCREEN = (1366, 768)


def _ensure_display(argv: list[str]) -> None:
    if os.environ.get("DISPLAY") or os.environ.get("DISCREG_LATENCY_CHILD"):
        return
    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        sys.exit("no display and no xvfb-run: install xvfb (scripts/setup.sh does)")
    os.environ["DISCREG_LATENCY_CHILD"] = "1"
    screen = f"-screen 0 {SCREEN[0]}x{SCREEN[1]}x24"
    os.execv(xvfb, [xvfb, "-a", "-s", screen, sys.executable, __file__, *argv])


class LatencyProbe:
    """A 50 ms QTimer whose ticks record how late they came (seconds)."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.late: list[float] = []
        self._last = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.late.append(max(0.0, now - self._last - TICK_MS / 1000.0))
        self._last = now

    def start(self) -> None:
        self.late, self._last = [], None
        self.timer.start()

    def stop(self) -> list[float]:
        self.timer.stop()
        return list(self.late)


def wait_until(app, predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.processEvents()
        if predicate():
            return True
        time.sleep(0.002)
    return False


def measure(app, probe, start, is_running, *, stop=None, stop_after: float | None = None):
    """Run one action: (worst lateness, p99, wall seconds, seconds from Stop to the end)."""
    import numpy as np

    probe.start()
    t0 = time.perf_counter()
    start()
    stop_to_end = None
    if stop is not None and stop_after is not None:
        wait_until(app, lambda: time.perf_counter() - t0 > stop_after or not is_running(), 600)
        t_stop = time.perf_counter()
        stop()
        wait_until(app, lambda: not is_running(), 600)
        stop_to_end = time.perf_counter() - t_stop
    else:
        wait_until(app, lambda: not is_running(), 600)
    wait_until(app, lambda: False, 0.3)  # let queued result handlers run
    wall = time.perf_counter() - t0
    late = probe.stop()
    arr = np.asarray(late or [0.0])
    return float(arr.max()), float(np.percentile(arr, 99)), wall, stop_to_end


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapt-steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="one repeat, 2 steps, no docs")
    parser.add_argument("--out-dir", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    _ensure_display(argv)
    if args.quick:
        args.repeats, args.adapt_steps = 1, 2

    import numpy as np
    from _protocol import update_section
    from qtpy.QtWidgets import QApplication

    from napari_discreg._app import make_viewer
    from napari_discreg._widgets import AdaptationWidget, RegisterWidget

    viewer = make_viewer(show=True)
    app = QApplication.instance()
    window = viewer.window._qt_window
    wait_until(app, lambda: False, 1.0)
    widgets = {type(w).__name__: w for w in _plugin_widgets(viewer)}
    reg: RegisterWidget = widgets["RegisterWidget"]
    ada: AdaptationWidget = widgets["AdaptationWidget"]
    probe = LatencyProbe()
    rows: list[tuple] = []

    def repeated(n: int, button, is_running, stop_button=None, stop_after=None) -> list:
        """``n`` measurements of clicking ``button`` (and ``stop_button`` after
        ``stop_after`` seconds)."""
        stop = None if stop_button is None else stop_button.click
        return [
            measure(app, probe, button.click, is_running, stop=stop, stop_after=stop_after)
            for _ in range(n)
        ]

    def run_register(method: str, label: str, **kw) -> None:
        reg.model_box.set_method(method)
        for steps_key, value in kw.items():
            getattr(reg.model_box, steps_key).setValue(value)
        rows.append((label, repeated(args.repeats, reg.register_button, reg_running)))

    def reg_running() -> bool:
        return reg.is_running

    def ada_running() -> bool:
        return ada.is_running

    run_register("network", "Register (default: affine + network, histograms)")
    run_register("bspline", "Register (bspline + histograms)")
    run_register(
        "network+adam", "Register with refinement (network+adam, 40 steps)", adam_steps_spin=40
    )
    reg.model_box.set_method("network")
    rows.append(
        (
            "Register, Stop after 50 ms",
            repeated(args.repeats, reg.register_button, reg_running, reg.stop_button, 0.05),
        )
    )

    # adaptation on the sample pair itself (layers as targets)
    n_adapt = max(1, args.repeats - 1)
    ada.steps_spin.setValue(args.adapt_steps)
    rows.append(
        (
            f"Adaptation, {args.adapt_steps} iterations",
            repeated(n_adapt, ada.start_button, ada_running),
        )
    )
    ada.steps_spin.setValue(1000)
    stop_results = repeated(n_adapt, ada.start_button, ada_running, ada.stop_button, 6.0)
    rows.append(("Adaptation, Stop after 6 s", stop_results))

    geometry = window.frameGeometry()
    screen = app.primaryScreen().availableGeometry()
    fits = geometry.width() <= screen.width() and geometry.height() <= screen.height()

    lines = [
        "## GUI responsiveness",
        "",
        "Generated by `python benchmarks/gui_latency.py` (a real napari viewer on a virtual "
        f"{SCREEN[0]} x {SCREEN[1]} screen, the sample pair, the three widgets docked as "
        "`scripts/run.sh` docks them, buttons clicked). A 50 ms timer measures how late the "
        "event loop answers; worst and 99th percentile over each job, median over "
        f"{args.repeats} repeat(s) (the first Register of a session also creates the "
        "layers: the worst of all repeats), and the time from Stop to the job's end. "
        "Goal: worst < 100 ms; Stop answered within 1 s.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s); window "
        f"{geometry.width()} x {geometry.height()} on a {screen.width()} x {screen.height()} "
        f"screen ({'fits' if fits else 'does NOT fit'}).",
        "",
        "| action | worst lateness (ms), median | worst of all repeats (ms) | p99 (ms) "
        "| job (s) | Stop -> end (s) |",
        "|---|---|---|---|---|---|",
    ]
    for label, results in rows:
        worst = np.median([r[0] for r in results]) * 1000
        worst_all = max(r[0] for r in results) * 1000
        p99 = np.median([r[1] for r in results]) * 1000
        wall = np.median([r[2] for r in results])
        stops = [r[3] for r in results if r[3] is not None]
        stop_text = f"{np.median(stops):.2f}" if stops else "-"
        lines.append(
            f"| {label} | {worst:.0f} | {worst_all:.0f} | {p99:.0f} | {wall:.2f} | {stop_text} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        update_section(args.out_dir / "benchmarks.md", "gui-latency", text)
    viewer.close()


def _plugin_widgets(viewer):
    from qtpy.QtWidgets import QWidget

    from napari_discreg._widgets import AdaptationWidget, HistogramInspectorWidget, RegisterWidget

    kinds = (RegisterWidget, HistogramInspectorWidget, AdaptationWidget)
    return [w for w in viewer.window._qt_window.findChildren(QWidget) if isinstance(w, kinds)]


if __name__ == "__main__":
    main()
