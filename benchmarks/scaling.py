"""Scaling: the same ``napari-discreg train --source DIR`` run on 1 and 2 CPU processes.

    python benchmarks/scaling.py [--steps 40] [--size 64] [--batch-size 4] [--out FILE.json]

Writes a folder of "your own scans" (slabs of the MNI template T1 as NIfTI volumes) to
a temporary directory, then times the training command under
``python -m torch.distributed.run --standalone --nproc-per-node P`` for

* 1 process, 1 thread, batch B (the baseline);
* 1 process, 2 threads, batch 2B (the same pairs per step as two processes);
* 2 processes (gloo), 1 thread each, batch B per process (2B pairs per step).

and prints a markdown table (steps/s and pairs/s of the training loop, the mean loss of
the first and last 5 steps, and whether the replicas ended identical), the numbers
docs/scaling.md quotes. Times are wall-clock seconds of the training loop as the
command records them (``runtime_s`` in the checkpoint), so start-up and the final
evaluation are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from napari_discreg.core.data import template as data
from napari_discreg.core.files import imagefiles
from napari_discreg.core.files.checkpoint import checkpoint_info


def make_scans(folder: Path, size: int) -> Path:
    """Four 'subjects': overlapping 30-slice slabs of the template T1, as NIfTI volumes."""
    template = data.load_template(size)
    out = folder / "t1"
    out.mkdir(parents=True)
    for s, lo in enumerate((35, 50, 65, 80)):
        volume = np.asarray(template.t1[lo : lo + 30]).transpose(1, 2, 0) * 1000.0
        imagefiles.write_image(out / f"subject{s}.nii.gz", volume.astype(np.float32))
    return out


def run(
    source: Path,
    out: Path,
    *,
    processes: int,
    threads: int,
    batch: int,
    steps: int,
    size: int,
) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    ckpt = out / f"p{processes}_t{threads}_b{batch}.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "napari_discreg",
        "train",
        "--source",
        str(source),
        "-o",
        str(ckpt),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--size",
        str(size),
        "--device",
        "cpu",
        "--eval-pairs",
        "0",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    info = checkpoint_info(ckpt)["training"]
    losses = np.array(info["loss_curve"])[:, 1]
    runtime = float(info["runtime_s"])
    dist = info["distributed"]
    return {
        "processes": processes,
        "threads_per_process": threads,
        "batch_per_process": batch,
        "pairs_per_step": dist["pairs_per_step"],
        "steps": steps,
        "runtime_s": runtime,
        "steps_per_s": steps / runtime,
        "pairs_per_s": steps * dist["pairs_per_step"] / runtime,
        "loss_first5": float(losses[:5].mean()),
        "loss_last5": float(losses[-5:].mean()),
        "max_weight_difference": dist["max_weight_difference"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| processes x threads | pairs per step | steps/s | pairs/s | loss, first 5 steps | "
        "loss, last 5 steps | replicas identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "-" if r["max_weight_difference"] is None else str(r["max_weight_difference"] == 0)
        lines.append(
            f"| {r['processes']} x {r['threads_per_process']} | {r['pairs_per_step']} | "
            f"{r['steps_per_s']:.2f} | {r['pairs_per_s']:.1f} | {r['loss_first5']:.3f} | "
            f"{r['loss_last5']:.3f} | {same} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    b = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        source = make_scans(Path(tmp) / "scans", args.size)
        rows = [
            run(
                source,
                Path(tmp),
                processes=p,
                threads=t,
                batch=bb,
                steps=args.steps,
                size=args.size,
            )
            for p, t, bb in ((1, 1, b), (1, 2, 2 * b), (2, 1, b))
        ]
    machine = {
        "cpu_cores": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "size": args.size,
    }
    print(f"machine: {machine}")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
