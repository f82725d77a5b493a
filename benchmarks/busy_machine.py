"""Registration on a busy machine: torch's thread count and OpenMP's wait policy.

    python benchmarks/busy_machine.py [--busy 2] [--repeats 4]

A user's laptop runs napari beside a browser and a build. This script times
``register()`` of one 192 px template pair (the default pipeline, the shipped model)
in a fresh process per setting: on a quiet machine, then beside ``--busy`` processes
that each multiply matrices with torch's default threads. Settings: torch's default
thread count or 1 thread, and OpenMP's default (spinning) or passive wait policy
(``OMP_WAIT_POLICY=PASSIVE``, which must be set before torch starts). Writes the
"busy-machine" section of docs/benchmarks.md. Nothing else may run beside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _protocol import update_section

DOCS = Path(__file__).resolve().parents[1] / "docs"

BUSY = """
import time, torch
a = torch.randn(800, 800)
end = time.time() + {seconds}
while time.time() < end:
    a = torch.tanh(a @ a * 1e-3)
"""

TIMED = """
import sys, time, numpy as np, torch
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
import napari_discreg as nd
from napari_discreg.core import data
from napari_discreg.core.config import DataConfig
cfg = DataConfig(size=192)
pair = data.make_pair(data.load_template(192), 116, "t1", "t2", np.random.default_rng(1), cfg)
model = nd.load_model()
nd.register(pair.fixed, pair.moving, model=model)  # warm-up
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    nd.register(pair.fixed, pair.moving, model=model)
    times.append(time.perf_counter() - start)
print(torch.get_num_threads(), float(np.median(times)))
"""

SETTINGS = (("default", 0), ("default", 1), ("passive", 0), ("passive", 1))


def timed(policy: str, threads: int, repeats: int) -> tuple[int, float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run(
        [sys.executable, "-c", TIMED, str(threads), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    used, seconds = out.stdout.split()[-2:]
    return int(used), float(seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--busy", type=int, default=2, help="busy processes beside the timed one")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out-dir", type=Path, default=DOCS)
    args = ap.parse_args(argv)
    words = sys.argv[1:] if argv is None else [str(a) for a in argv]
    rows = []
    for load in ("quiet", "busy"):
        procs = []
        if load == "busy":
            code = BUSY.format(seconds=600)
            procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(args.busy)]
            time.sleep(3)
        try:
            for policy, threads in SETTINGS:
                used, seconds = timed(policy, threads, args.repeats)
                rows.append((load, policy, used, seconds))
                print(rows[-1], flush=True)
        finally:
            for p in procs:
                p.kill()
    quiet = {(p, t): s for load, p, t, s in rows if load == "quiet"}
    base = quiet[("default", max(t for p, t in quiet if p == "default"))]
    lines = [
        "## Registration on a busy machine",
        "",
        f"Written by `{shlex.join(['python', 'benchmarks/busy_machine.py', *words])}`: "
        "`register()` of one 192 px template pair (default pipeline, shipped model), median of "
        f"{args.repeats} in a fresh process per setting, quiet and beside {args.busy} "
        "processes multiplying matrices with torch's default threads. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s).",
        "",
        "| machine | OpenMP wait | torch threads | seconds | x quiet default |",
        "|---|---|---|---|---|",
    ]
    for load, policy, used, seconds in rows:
        lines.append(f"| {load} | {policy} | {used} | {seconds:.2f} | {seconds / base:.1f} |")
    update_section(args.out_dir / "benchmarks.md", "busy-machine", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
