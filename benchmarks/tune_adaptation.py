"""Tune the default adaptation on a validation split, never on the test pairs.

    python benchmarks/tune_adaptation.py                       # every variant, T2 and PD
    python benchmarks/tune_adaptation.py --variants "b2 n1 x40" --contrasts t2

Adaptation data: 8 unlabelled T1 vs T2-/PD-like pairs from the training slices, at
192 x 192, as a user would bring them. Validation: other labelled pairs from the
*training* slice range (their ground truth only compares settings here); the held-out
test slices are not touched. Each variant is timed from the call of ``adapt_steps`` to
its last record; its raw weights at every criterion evaluation are evaluated
afterwards (untimed) for the accuracy-against-seconds curves. Writes the "tuning"
section of docs/benchmarks.md, docs/tuning.json and docs/images/tuning.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _protocol import adaptation_pairs, timed_adaptation, update_section

from napari_discreg.core.config import AdaptConfig, DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files.checkpoint import load_model
from napari_discreg.core.learning.evaluate import evaluate_model, identity_metrics, summarise

DOCS = Path(__file__).resolve().parents[1] / "docs"

SHORT = {"steps": 40, "batch_size": 2, "generator_updates": 1, "select_every": 5}
VARIANTS: dict[str, tuple[str, dict]] = {
    "AdaptConfig.mcd() (MCD's default)": ("pemd", {}),
    "b4 n2 x100 lr 2e-4 (old default)": (
        "pemd",
        {"steps": 100, "batch_size": 4, "generator_updates": 2, "select_every": 10, "lr": 2e-4},
    ),
    "b4 n2 x12 lr 2e-4": (
        "pemd",
        {"steps": 12, "batch_size": 4, "generator_updates": 2, "select_every": 3, "lr": 2e-4},
    ),
    "b2 n1 x40 lr 2e-4": ("pemd", {**SHORT, "lr": 2e-4}),
    "b2 n1 x40 lr 2e-4, lambda 0": ("pemd", {**SHORT, "lr": 2e-4, "discrepancy_weight": 0.0}),
    "b2 n1 x40 lr 5e-5": ("pemd", {**SHORT, "lr": 5e-5}),
    "b2 n1 x40 lr 2e-5": ("pemd", {**SHORT, "lr": 2e-5}),
    "b2 n1 x40 lr 1e-5": ("pemd", {**SHORT, "lr": 1e-5}),
    "b4 n1 x20 lr 2e-5": (
        "pemd",
        {"steps": 20, "batch_size": 4, "generator_updates": 1, "select_every": 4, "lr": 2e-5},
    ),
    "b2 n1 x40 lr 2e-5, lambda 2": ("pemd", {**SHORT, "lr": 2e-5, "discrepancy_weight": 2.0}),
    "b2 n1 x40 lr 2e-5 pEMD 16+": ("pemd16+", {**SHORT, "lr": 2e-5}),
    "b2 n1 x40 lr 2e-5 SWD": ("swd", {**SHORT, "lr": 2e-5}),
    "b2 n1 x40 lr 2e-5 L1": ("l1", {**SHORT, "lr": 2e-5}),
}
"""name -> (discrepancy, AdaptConfig fields); every variant names each field it changes
from the dataclass defaults, so the table stays true when the defaults move.
bN nM xS: batch N, M generator updates in step C, S iterations."""


def validation_pairs(cfg: DataConfig, n: int, moving: str) -> list:
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
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--n-adapt", type=int, default=8)
    ap.add_argument("--contrasts", nargs="+", default=["t2", "pd"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--out-dir", type=Path, default=DOCS)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = DataConfig(size=args.size)
    template = data.load_template(cfg.size)
    model = load_model(args.model, device="cpu")
    mc = model.config
    results: dict = {}
    for contrast in args.contrasts:
        val = validation_pairs(cfg, args.n_val, contrast)
        af, am = adaptation_pairs(template, cfg, n=args.n_adapt, moving_contrast=contrast)
        rows = {
            "identity": summarise(
                identity_metrics(val, mc.stride, mc.num_labels, mc.capture_range)
            ),
            "before adaptation": summarise(evaluate_model(model, val)),
        }
        runs: dict = {}
        for name in args.variants:
            kind, fields = VARIANTS[name]
            acfg = replace(AdaptConfig.mcd(), **fields)
            runs[name] = timed_adaptation(model, af, am, kind, acfg, val)
            runs[name].update(discrepancy=kind, config=acfg.to_dict())
            k = runs[name]["kept"]
            best = max(c["accuracy"] for c in runs[name]["curve"])
            print(
                f"{contrast} {name}: {runs[name]['seconds']:.1f} s, kept it {runs[name]['kept_iteration']} "
                f"{100 * k['label_accuracy']:.1f} % {k['epe']:.2f} px, best raw {100 * best:.1f} %",
                flush=True,
            )
            results[contrast] = {"rows": rows, "runs": runs}
            write(results, args, argv)  # after every run: a stopped sweep still reports
    return 0


def write(results: dict, args, argv) -> None:
    meta = {
        "size": args.size,
        "n_val": args.n_val,
        "n_adapt": args.n_adapt,
        "model": args.model or "shipped",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    out = args.out_dir
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot_curves(results, out / "images" / "tuning.png", "validation label accuracy (%)")
    update_section(out / "benchmarks.md", "tuning", markdown(results, meta, argv))


def markdown(results: dict, meta: dict, argv) -> str:
    words = sys.argv[1:] if argv is None else argv
    cmd = shlex.join(["python", "benchmarks/tune_adaptation.py", *words])
    lines = [
        "## Tuning the short default adaptation (validation split, not the test pairs)",
        "",
        f"Written by `{cmd}`. Model: {meta['model']}. {meta['size']} x {meta['size']} px; "
        f"adaptation on {meta['n_adapt']} unlabelled pairs, {meta['n_val']} labelled validation "
        f"pairs, all from the training slices. CPU: {meta['machine']}. Seconds: wall time of "
        '`adapt_steps`, selection criterion included. "kept": the weights the keep-best rule '
        'returns (network only); "best raw": the best validation accuracy among the weights '
        "the criterion saw. bN nM xS: batch N, M generator updates in step C, S iterations. "
        "With --threads the seconds come from that many threads of a machine that may have "
        "been running other jobs: compare them within this table only (the timed figures are "
        'in "Short adaptation").',
        "",
    ]
    for contrast, res in results.items():
        ident = res["rows"]["identity"]
        lines += [
            f"### T1 fixed vs {contrast.upper()}-like moving",
            "",
            "| variant | discrepancy | seconds | kept iteration | label acc. | EPE (px) | EPE / identity | best raw acc. |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in res["rows"].items():
            lines.append(
                f"| {name} | - | 0 | - | {100 * row['label_accuracy']:.1f} % | {row['epe']:.2f} | "
                f"{row['epe'] / ident['epe']:.2f} | - |"
            )
        for name, run in res["runs"].items():
            k = run["kept"]
            best = max(c["accuracy"] for c in run["curve"])
            lines.append(
                f"| {name} | {run['discrepancy']} | {run['seconds']:.1f} | {run['kept_iteration']} | "
                f"{100 * k['label_accuracy']:.1f} % | {k['epe']:.2f} | {k['epe'] / ident['epe']:.2f} | "
                f"{100 * best:.1f} % |"
            )
        lines.append("")
    lines.append("![validation accuracy against seconds](images/tuning.png)")
    return "\n".join(lines)


def plot_curves(results: dict, path: Path, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (contrast, res) in zip(axes[0], results.items(), strict=True):
        for name, run in res["runs"].items():
            xs = [c["seconds"] for c in run["curve"]]
            ys = [100 * c["accuracy"] for c in run["curve"]]
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        for name, style in (("identity", ":"), ("before adaptation", "--")):
            ax.axhline(
                100 * res["rows"][name]["label_accuracy"], ls=style, color="gray", label=name
            )
        ax.axvline(30, color="red", lw=0.8, alpha=0.5)
        ax.set(
            title=f"T1 vs {contrast.upper()}-like", xlabel="wall-clock seconds (CPU)", ylabel=ylabel
        )
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
