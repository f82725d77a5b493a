"""Registration and adaptation on a busy machine: torch's thread count and OpenMP's wait.

    python benchmarks/busy_machine.py [--busy 2] [--repeats 3]

A user's laptop runs napari beside a browser and a build. This script times, in a
fresh process per setting, ``register()`` of one 192 px template pair (the default
pipeline, the shipped model) and a short default adaptation (20 self-training steps of
the ``mono`` model on 8 built-in 96 px T1/T2-like pairs), on a quiet machine and beside
``--busy`` processes that multiply matrices with torch's default threads. Settings:
the thread choice of the runs (``NAPARI_DISCREG_THREADS``: ``auto``, the product's
default, which leaves the cores other work takes; ``torch``, torch's own count; ``1``)
and OpenMP's wait policy (default spinning, or ``OMP_WAIT_POLICY=PASSIVE``, which must
be set before torch starts). Writes the "busy-machine" section of docs/benchmarks.md.
Nothing else may run beside it.
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
import napari_discreg as nd
from napari_discreg.core.data import template as data
from napari_discreg.core.config import AdaptConfig, DataConfig
from napari_discreg.core.threads import use_threads_for_load
setting, repeats = sys.argv[1], int(sys.argv[2])
cfg = DataConfig(size=192)
pair = data.make_pair(data.load_template(192), 116, "t1", "t2", np.random.default_rng(1), cfg)
model = nd.load_model()
small = DataConfig(size=96)
pairs = data.fixed_test_pairs(
    data.load_template(96), small, n=8, fixed_contrast="t1", moving_contrast="t2", seed=0
)
fixed = np.stack([p.fixed for p in pairs])
moving = np.stack([p.moving for p in pairs])
used = use_threads_for_load(setting)  # what the runs do when they start
nd.register(pair.fixed, pair.moving, model=model)  # warm-up
times = []
for _ in range(repeats):
    start = time.perf_counter()
    nd.register(pair.fixed, pair.moving, model=model)
    times.append(time.perf_counter() - start)
mono = nd.load_model("mono")
use_threads_for_load(setting)
start = time.perf_counter()
nd.adapt(mono, fixed, moving, config=AdaptConfig(steps=20), data_config=small)
adapt_s = time.perf_counter() - start
print(used, float(np.median(times)), adapt_s)
"""

SETTINGS = (("default", "torch"), ("default", "1"), ("passive", "torch"), ("default", "auto"))


def timed(policy: str, threads: str, repeats: int) -> tuple[int, float, float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run(
        [sys.executable, "-c", TIMED, threads, str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    used, seconds, adapt_s = out.stdout.split()[-3:]
    return int(used), float(seconds), float(adapt_s)


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
            code = BUSY.format(seconds=900)
            procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(args.busy)]
            time.sleep(3)
        try:
            for policy, threads in SETTINGS:
                used, seconds, adapt_s = timed(policy, threads, args.repeats)
                rows.append((load, policy, threads, used, seconds, adapt_s))
                print(rows[-1], flush=True)
        finally:
            for p in procs:
                p.kill()
    quiet = {(p, t): (s, a) for load, p, t, _, s, a in rows if load == "quiet"}
    base_s, base_a = quiet[("default", "torch")]
    lines = [
        "## Registration and adaptation on a busy machine",
        "",
        f"Written by `{shlex.join(['python', 'benchmarks/busy_machine.py', *words])}`: "
        "`register()` of one 192 px template pair (default pipeline, shipped model; median of "
        f"{args.repeats}) and a short default adaptation (20 self-training steps of the `mono` "
        "model on 8 built-in 96 px pairs), in a fresh process per setting, quiet and beside "
        f"{args.busy} processes multiplying matrices with torch's default threads. "
        "`auto` is the product's default (`NAPARI_DISCREG_THREADS`): torch's count lowered "
        "to the cores other work leaves free when a run starts. Ratios are to the quiet "
        "machine with torch's own count. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s).",
        "",
        "| machine | OpenMP wait | threads setting | torch threads | register s | x quiet "
        "| adapt s | x quiet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for load, policy, threads, used, seconds, adapt_s in rows:
        lines.append(
            f"| {load} | {policy} | {threads} | {used} | {seconds:.2f} | {seconds / base_s:.1f} "
            f"| {adapt_s:.1f} | {adapt_s / base_a:.1f} |"
        )
    # the floor of any thread choice: a fair share of the cores among the runnable threads
    cores = os.cpu_count() or 1
    share = min(1.0, cores / (args.busy * cores + 1))
    one_s, one_a = quiet[("default", "1")]
    lines += [
        "",
        f"Floor: beside {args.busy} busy processes of {cores} threads each, one thread of ours "
        f"gets a fair share of {share:.2f} of a core, so no thread choice can beat the quiet "
        f"1-thread time / {share:.2f}: register {one_s / share:.2f} s "
        f"({one_s / share / base_s:.1f} x quiet), adapt {one_a / share:.1f} s "
        f"({one_a / share / base_a:.1f} x quiet).",
    ]
    update_section(args.out_dir / "benchmarks.md", "busy-machine", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
