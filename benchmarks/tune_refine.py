"""Choose the defaults of RefineConfig on validation pairs (never the test pairs).

    python benchmarks/tune_refine.py [--pairs 12] [--steps 50]

Validation pairs: T1 fixed vs T2-like moving, made from the *training* slice range with
seeds of their own (the test pairs of every benchmark come from the held-out test
slices). The refinement starts from a zero field here, so that the search does not
depend on a particular network. Writes the "refine-tuning" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _protocol import update_section

from napari_discreg.core.config import DataConfig, RefineConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.registration.metrics import end_point_error
from napari_discreg.core.registration.preprocess import network_input
from napari_discreg.core.registration.refine import refine_field

DOCS = Path(__file__).resolve().parents[1] / "docs"


def validation_pairs(n: int, size: int, contrast: str = "t2"):
    cfg = DataConfig(size=size, max_displacement=6.0 * size / 128)
    template = data.load_template(size)
    lo, hi = cfg.train_slices
    slices = np.linspace(lo, hi - 1, n).round().astype(int)
    return [
        data.make_pair(template, int(i), "t1", contrast, np.random.default_rng([5, k]), cfg)
        for k, i in enumerate(slices)
    ]


def score(pairs, config: RefineConfig) -> tuple[float, float]:
    """(mean EPE over the pairs' foreground, mean seconds per pair)."""
    epes, secs = [], []
    for p in pairs:
        f, m = network_input(p.fixed, 1), network_input(p.moving, 1)
        t0 = time.perf_counter()
        field = refine_field(f, m, None, config)
        secs.append(time.perf_counter() - t0)
        epes.append(end_point_error(field[0].numpy(), p.displacement, p.mask))
    return float(np.mean(epes)), float(np.mean(secs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)

    pairs = validation_pairs(args.pairs, args.size)
    identity = float(
        np.mean(
            [end_point_error(np.zeros_like(p.displacement), p.displacement, p.mask) for p in pairs]
        )
    )
    grid = {
        "lr": (0.3, 1.0),
        "smoothness": (0.03, 0.1, 0.3),
        "grid_stride": (1, 2, 4),
        "radius": (1, 2),
        "dilation": (1, 2, 3),
    }
    base = RefineConfig(steps=args.steps, levels=1)
    results = []
    t_all = time.perf_counter()
    for values in itertools.product(*grid.values()):
        cfg = replace(base, **dict(zip(grid, values, strict=True)))
        epe, sec = score(pairs, cfg)
        results.append((epe, sec, cfg))
        print(f"{epe:.3f} px {sec:.3f} s {dict(zip(grid, values, strict=True))}", flush=True)
    results.sort(key=lambda r: r[0])
    best = results[0][2]
    # how the step count trades time for accuracy at the chosen settings
    steps_rows = [(n, *score(pairs, replace(best, steps=n))) for n in (10, 20, 30, 50, 100)]
    # larger images carry larger deformations (scaled with the size): resolution levels
    # and smoothness, judged by the mean EPE over three sizes
    sizes = (128, 192, 256)
    level_pairs = {size: validation_pairs(max(4, args.pairs // 2), size) for size in sizes}
    level_rows = []
    for levels, smooth in itertools.product((1, 2, 3), (0.03, 0.1)):
        cfg = replace(best, levels=levels, smoothness=smooth)
        per_size = [score(level_pairs[size], cfg) for size in sizes]
        level_rows.append((float(np.mean([e for e, _ in per_size])), levels, smooth, per_size))
        print(level_rows[-1], flush=True)
    level_rows.sort(key=lambda r: r[0])
    chosen = replace(best, levels=level_rows[0][1], smoothness=level_rows[0][2])
    elapsed = time.perf_counter() - t_all
    lines = [
        "## Refinement settings (validation pairs)",
        "",
        f"Written by `python benchmarks/tune_refine.py --pairs {args.pairs} --size {args.size} "
        f"--steps {args.steps}` ({elapsed:.0f} s, {torch.get_num_threads()} CPU threads). "
        f"{args.pairs} T1 vs T2-like pairs of {args.size} px from the *training* slices (the "
        "test pairs are never used to choose settings), refinement from a zero field. "
        f"Identity EPE {identity:.2f} px. Grid: "
        + ", ".join(f"{k} {list(v)}" for k, v in grid.items())
        + ".",
        "",
        "| rank | EPE (px) | s / pair | lr | smoothness | grid stride | radius | dilation |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {i + 1} | {e:.3f} | {s:.3f} | {c.lr} | {c.smoothness} | {c.grid_stride} | "
            f"{c.radius} | {c.dilation} |"
            for i, (e, s, c) in enumerate(results[:8])
        ],
        f"| worst | {results[-1][0]:.3f} | {results[-1][1]:.3f} | {results[-1][2].lr} | "
        f"{results[-1][2].smoothness} | {results[-1][2].grid_stride} | {results[-1][2].radius} | "
        f"{results[-1][2].dilation} |",
        "",
        "Steps at the best settings:",
        "",
        "| steps | EPE (px) | s / pair |",
        "|---|---|---|",
        *[f"| {n} | {e:.3f} | {s:.3f} |" for n, e, s in steps_rows],
        "",
        f"Resolution levels and smoothness at those settings, on {max(4, args.pairs // 2)} "
        f"validation pairs per size (deformations scale with the size; identity EPE "
        + ", ".join(
            f"{np.mean([end_point_error(np.zeros_like(p.displacement), p.displacement, p.mask) for p in level_pairs[z]]):.2f} px at {z}"
            for z in sizes
        )
        + "):",
        "",
        "| levels | smoothness | mean EPE | " + " | ".join(f"EPE {z} px / s" for z in sizes) + " |",
        "|---|---|---|" + "---|" * len(sizes),
        *[
            f"| {lv} | {sm} | {m:.3f} | " + " | ".join(f"{e:.3f} / {t:.3f}" for e, t in per) + " |"
            for m, lv, sm, per in level_rows
        ],
        "",
        f"`RefineConfig` defaults: the best single-level row, then the best levels and "
        f"smoothness by mean EPE over the sizes (`{chosen}`).",
    ]
    update_section(DOCS / "benchmarks.md", "refine-tuning", "\n".join(lines))
    print(chosen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
