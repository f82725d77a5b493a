"""Tune MCD settings on a validation split, never on the test pairs.

    python benchmarks/tune_adaptation.py --steps 100 --variants default ...

Adaptation data: unlabelled T1 vs T2-like pairs from the training slices (as in the
benchmark). Validation: other T1 vs T2-like pairs from the *training* slice range, with
their ground truth used only to compare settings here. The held-out test slices are
not touched. Writes the "tuning" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import napari_discreg as nd
from napari_discreg.core import data
from napari_discreg.core.benchmark import adaptation_pairs, update_section
from napari_discreg.core.config import AdaptConfig, DataConfig
from napari_discreg.core.evaluate import evaluate_model, summarise

DOCS = Path(__file__).resolve().parents[1] / "docs"

VARIANTS = {
    "default": {},
    "no-source-in-C": {"source_weight_c": 0.0},
    "n2": {"generator_updates": 2},
    "lr1e-4": {"lr": 1e-4},
    "lambda0.5": {"discrepancy_weight": 0.5},
    "lambda2": {"discrepancy_weight": 2.0},
    "pemd-marginals": {"pemd_diagonals": False},
    "batch4": {"batch_size": 4},
    "fast": {"batch_size": 4, "generator_updates": 2},
    "fast-lr1e-4": {"batch_size": 4, "generator_updates": 2, "lr": 1e-4},
    "fast-lr5e-4": {"batch_size": 4, "generator_updates": 2, "lr": 5e-4},
    "fast-noCE": {"batch_size": 4, "generator_updates": 2, "source_weight_c": 0.0},
}


def validation_pairs(cfg: DataConfig, n: int, moving: str):
    template = data.load_template(cfg.size)
    lo, hi = cfg.train_slices
    idx = np.linspace(lo + 1, hi - 2, n).round().astype(int)
    return [
        data.make_pair(template, int(i), "t1", moving, np.random.default_rng([4242, k]), cfg)
        for k, i in enumerate(idx)
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n-val", type=int, default=24)
    ap.add_argument("--n-adapt", type=int, default=64)
    ap.add_argument("--discrepancies", nargs="+", default=["l1", "swd", "pemd"])
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    ap.add_argument("--moving-contrast", default="t2")
    ap.add_argument(
        "--eval-every", type=int, default=0, help="also evaluate on validation every N iterations"
    )
    ap.add_argument("--out", type=Path, default=DOCS / "tuning.json")
    args = ap.parse_args(argv)

    cfg = DataConfig()
    template = data.load_template(cfg.size)
    val = validation_pairs(cfg, args.n_val, args.moving_contrast)
    af, am = adaptation_pairs(template, cfg, n=args.n_adapt, moving_contrast=args.moving_contrast)
    results = {"source-only": summarise(evaluate_model(nd.load_model(device="cpu"), val))}
    print("source-only", results["source-only"])
    for variant in args.variants:
        acfg = replace(AdaptConfig(), **VARIANTS[variant])
        for kind in args.discrepancies:
            model = nd.load_model(device="cpu")
            t0 = time.perf_counter()
            curve = []
            for rec in nd.adapt_steps(
                model, af, am, discrepancy=kind, steps=args.steps, config=acfg, device="cpu"
            ):
                entry = {"iteration": rec.iteration, "criterion": rec.criterion, **rec.losses}
                if args.eval_every and rec.iteration % args.eval_every == 0:
                    entry["val"] = summarise(evaluate_model(model, val))
                    model.train()
                curve.append(entry)
                if "val" in entry:
                    v = entry["val"]
                    print(
                        f"  {variant}/{kind} it {rec.iteration}: crit {rec.criterion} acc {v['label_accuracy']:.3f} epe {v['epe']:.2f}",
                        flush=True,
                    )
            name = f"{variant}/{kind}"
            results[name] = {
                **summarise(evaluate_model(model, val)),
                "best_iteration": rec.best_iteration,
                "adapt_seconds": time.perf_counter() - t0,
                "curve": curve,
            }
            print(name, {k: v for k, v in results[name].items() if k != "curve"}, flush=True)
    args.out.write_text(json.dumps(results, indent=1, default=float))
    lines = [
        "## Tuning of the adaptation settings (validation split, not the test pairs)",
        "",
        f"Written by `python benchmarks/tune_adaptation.py --steps {args.steps} --variants {' '.join(args.variants)}`. "
        f"{args.n_val} labelled validation pairs (T1 vs {args.moving_contrast.upper()}-like) from the training "
        f"slices; adaptation on {args.n_adapt} unlabelled pairs from the same range; {args.steps} iterations.",
        "",
        "| settings / discrepancy | label acc. (%) | EPE (px) | best iteration (by NMI) | adapt s |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {100 * r['label_accuracy']:.1f} | {r['epe']:.2f} | {r.get('best_iteration', '-')} | "
            f"{r.get('adapt_seconds', 0):.0f} |"
        )
    update_section(DOCS / "benchmarks.md", "tuning", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
