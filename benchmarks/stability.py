"""Long MCD-pEMD run: does keeping the best weights by the unsupervised criterion hold?

    python benchmarks/stability.py --steps 1000 --eval-every 25

Adapts a model (default: the shipped one; ``--model mono`` is the paper-protocol source
model, which starts far from the target) with the default settings, except those
given, and, every ``--eval-every`` iterations, evaluates (evaluation only: nothing here
feeds back into adaptation) the current weights on held-out T1 vs T2-like test pairs,
next to the unsupervised selection criterion (``AdaptConfig.criterion``, on the
unlabelled adaptation pairs). ``keep_best=False`` so
that the curve shows the raw weights; the "kept" line shows what a user with the
default ``keep_best=True`` would get at each point: the weights with the best criterion
so far. Writes the "stability" section of docs/benchmarks.md and docs/images/stability.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _protocol import adaptation_pairs, update_section

import napari_discreg as nd
from napari_discreg.core.config import SELECTION_CRITERIA, AdaptConfig, DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.learning.evaluate import evaluate_model, summarise
from napari_discreg.core.registration.predict import prepare_target, selection_scores

DOCS = Path(__file__).resolve().parents[1] / "docs"


def write_report(points, args, seconds: float) -> None:
    """Plot and the docs section; called after every evaluation so a stopped run still reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [p["iteration"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(it, [100 * p["accuracy"] for p in points], label="current weights")
    axes[0].plot(
        it, [100 * p["kept_accuracy"] for p in points], label="kept (best criterion so far)"
    )
    axes[0].set_ylabel("target label accuracy (%)")
    axes[1].plot(it, [p["epe"] for p in points], label="current weights")
    axes[1].plot(it, [p["kept_epe"] for p in points], label="kept")
    axes[1].set_ylabel("target EPE (px)")
    axes[2].plot(it, [p["criterion"] for p in points], color="tab:green")
    axes[2].set_ylabel(f"criterion: {points[0]['criterion_kind']} (unlabelled)")
    for ax in axes:
        ax.set_xlabel("MCD iteration")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    (DOCS / "images").mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS / "images" / "stability.png", dpi=110)
    plt.close(fig)
    first, last = points[0], points[-1]
    best_raw = max(points, key=lambda p: p["accuracy"])
    best_epe = min(points, key=lambda p: p["epe"])
    text = "\n".join(
        [
            f"## Stability of a long {args.discrepancy} run",
            "",
            f"Written by `{args.command}` ({seconds:.0f} s). Model: {args.model or 'default'}; "
            f"settings: {args.settings}. Evaluation on {args.n_test} held-out T1 vs T2-like test "
            f"pairs (evaluation only); criterion ({points[0]['criterion_kind']}) on the unlabelled "
            "adaptation pairs.",
            "",
            "| iteration | criterion | accuracy, current (%) | EPE, current | accuracy, kept (%) | EPE, kept |",
            "|---|---|---|---|---|---|",
            *[
                f"| {p['iteration']} | {p['criterion']:.4f} | {100 * p['accuracy']:.1f} | {p['epe']:.2f} | "
                f"{100 * p['kept_accuracy']:.1f} | {p['kept_epe']:.2f} |"
                for p in points
            ],
            "",
            f"From iteration {first['iteration']} to {last['iteration']}, the kept model went from "
            f"{100 * first['kept_accuracy']:.1f} % / {first['kept_epe']:.2f} px to "
            f"{100 * last['kept_accuracy']:.1f} % / {last['kept_epe']:.2f} px. Best raw weights "
            f"of the run: {100 * best_raw['accuracy']:.1f} % (iteration {best_raw['iteration']}); "
            f"the kept weights end {100 * (best_raw['accuracy'] - last['kept_accuracy']):.1f} points "
            f"below them and {100 * (last['kept_accuracy'] - first['accuracy']):+.1f} points from the "
            "start (the keep-best goal: within 2 points of the best raw, never below the start).",
            "",
            "Every criterion on the same weights (evaluated on 16 of the unlabelled pairs), "
            "and what keeping the best of each so far would have given at the end:",
            "",
            "| criterion | kept at the end: accuracy (%) | EPE | points below the best raw |",
            "|---|---|---|---|",
            *[
                f"| {k}{' (default)' if k == points[0]['criterion_kind'] else ''} | "
                f"{100 * v['accuracy']:.1f} | {v['epe']:.2f} | "
                f"{100 * (best_raw['accuracy'] - v['accuracy']):.1f} |"
                for k, v in last["kept_by"].items()
            ],
            f"| best raw (test labels, for reference) | {100 * best_raw['accuracy']:.1f} | "
            f"{best_raw['epe']:.2f} | 0 |",
            f"| lowest raw EPE (test labels, for reference) | {100 * best_epe['accuracy']:.1f} | "
            f"{best_epe['epe']:.2f} | {100 * (best_raw['accuracy'] - best_epe['accuracy']):.1f} |",
            "",
            "![stability](images/stability.png)",
        ]
    )
    update_section(DOCS / "benchmarks.md", "stability", text)
    (DOCS / "stability.json").write_text(json.dumps(points, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--n-adapt", type=int, default=64)
    ap.add_argument("--discrepancy", default="pemd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="checkpoint or shipped model name")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--generator-updates", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    args.command = "python benchmarks/stability.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = DataConfig()
    template = data.load_template(cfg.size)
    test = data.fixed_test_pairs(
        template, cfg, n=args.n_test, fixed_contrast="t1", moving_contrast="t2", seed=123
    )
    af, am = adaptation_pairs(template, cfg, n=args.n_adapt, moving_contrast="t2")
    given = {
        "lr": args.lr,
        "batch_size": args.batch_size,
        "generator_updates": args.generator_updates,
    }
    acfg = replace(
        AdaptConfig.mcd(),
        select_every=args.eval_every,
        keep_best=False,
        seed=args.seed,
        **{k: v for k, v in given.items() if v is not None},
    )
    args.settings = (
        f"batch {acfg.batch_size}, n = {acfg.generator_updates}, lr {acfg.lr:g}, "
        f"lambda {acfg.discrepancy_weight:g}, source weight in C {acfg.source_weight_c:g}"
    )
    model = nd.load_model(args.model, device="cpu")
    sel_f, sel_m, sel_mask = prepare_target(af[:16], am[:16], model.config.stride, "cpu")
    points = []
    best = {k: (-np.inf, None) for k in SELECTION_CRITERIA}
    t0 = time.perf_counter()
    for rec in nd.adapt_steps(
        model, af, am, discrepancy=args.discrepancy, steps=args.steps, config=acfg, device="cpu"
    ):
        if rec.criterion is None:
            continue
        ev = summarise(evaluate_model(model, test))
        scores = selection_scores(model, sel_f, sel_m, sel_mask)
        model.train()
        for kind, score in scores.items():
            if score > best[kind][0]:
                best[kind] = (score, ev)
        points.append(
            {
                "iteration": rec.iteration,
                "criterion": scores[acfg.criterion],
                "criterion_kind": acfg.criterion,
                "accuracy": ev["label_accuracy"],
                "epe": ev["epe"],
                "kept_accuracy": best[acfg.criterion][1]["label_accuracy"],
                "kept_epe": best[acfg.criterion][1]["epe"],
                "scores": scores,
                "kept_by": {
                    k: {"accuracy": b[1]["label_accuracy"], "epe": b[1]["epe"]}
                    for k, b in best.items()
                },
            }
        )
        print(points[-1], f"{time.perf_counter() - t0:.0f} s", flush=True)
        write_report(points, args, time.perf_counter() - t0)

    print(f"done: {len(points)} evaluations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
