"""Short adaptation: accuracy against wall-clock seconds on a user's budget.

    python benchmarks/short_adaptation.py            # 40 test pairs per contrast
    python benchmarks/short_adaptation.py --quick    # a smoke run of the same code path

For T1 fixed vs T2-like and PD-like moving, at 192 x 192: identity, the model before
adaptation, and each adaptation variant run on 8 unlabelled target pairs (from the
training slices) exactly as ``adapt_steps`` runs for a user, timed from the call to the
last record (selection criterion included). The raw weights every ``select_every``
iterations are evaluated afterwards (not timed) on held-out test pairs, which gives the
time-to-accuracy curves; the kept weights (keep-best rule) give the table. Writes the
"short-adaptation" section of docs/benchmarks.md, docs/short_adaptation.json and
docs/images/short_adaptation.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import torch
from _protocol import adaptation_pairs, timed_adaptation, update_section

from napari_discreg.core.config import AdaptConfig, DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files.checkpoint import load_model
from napari_discreg.core.learning.evaluate import evaluate_model, identity_metrics, summarise

DOCS = Path(__file__).resolve().parents[1] / "docs"

# name -> (model, method, discrepancy, AdaptConfig overrides); "default" rows are the
# product's default: what the widget's Start and `napari-discreg adapt` do with no options
VARIANTS: dict[str, tuple[str, str, str, dict]] = {
    "mono model, default (self-training)": ("mono", "self-training", "pemd", {}),
    "mono model, MCD pEMD (the paper's)": ("mono", "mcd", "pemd", {}),
    "mono model, MCD pEMD 16+": ("mono", "mcd", "pemd16+", {}),
    "default model, default (self-training)": ("default", "self-training", "pemd", {}),
    "default model, MCD pEMD": ("default", "mcd", "pemd", {}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--n-adapt", type=int, default=8)
    ap.add_argument("--contrasts", nargs="+", default=["t2", "pd"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out-dir", type=Path, default=DOCS)
    ap.add_argument(
        "--section",
        default="short-adaptation",
        help="docs/benchmarks.md section to write (another name keeps the main one)",
    )
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    n_test = 4 if args.quick else args.n_test
    quick = {"steps": 2, "select_every": 1} if args.quick else {}
    if args.quick:
        args.variants = args.variants[:1]
    dcfg = DataConfig(size=args.size)
    template = data.load_template(args.size)
    models = {
        name: load_model(name, device="cpu") for name in {VARIANTS[v][0] for v in args.variants}
    }
    mc = models["default"].config if "default" in models else next(iter(models.values())).config
    results = {}
    for contrast in args.contrasts:
        test_pairs = data.fixed_test_pairs(
            template, dcfg, n=n_test, fixed_contrast="t1", moving_contrast=contrast, seed=123
        )
        fixed, moving = adaptation_pairs(template, dcfg, n=args.n_adapt, moving_contrast=contrast)
        rows = {
            "identity": summarise(
                identity_metrics(test_pairs, mc.stride, mc.num_labels, mc.capture_range)
            ),
            **{
                f"{name} model, before adaptation": summarise(evaluate_model(m, test_pairs))
                for name, m in models.items()
            },
        }
        runs = {}
        for name in args.variants:
            model_name, method, kind, overrides = VARIANTS[name]
            cfg = AdaptConfig.for_method(method, **{**overrides, **quick})
            runs[name] = timed_adaptation(models[model_name], fixed, moving, kind, cfg, test_pairs)
            runs[name]["config"] = cfg.to_dict()
            runs[name]["discrepancy"] = kind
            print(
                contrast,
                name,
                f"{runs[name]['seconds']:.1f} s",
                runs[name]["kept"]["label_accuracy"],
                runs[name]["kept"]["epe"],
                flush=True,
            )
        results[contrast] = {"rows": rows, "runs": runs}
    meta = {
        "configs": {
            m: AdaptConfig.for_method(m, **quick).to_dict() for m in ("self-training", "mcd")
        },
        "size": args.size,
        "n_test": n_test,
        "n_adapt": args.n_adapt,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    out = args.out_dir
    (out / "images").mkdir(parents=True, exist_ok=True)
    stem = args.section.replace("-", "_")
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=float)
    )
    _plot(results, out / "images" / f"{stem}.png")
    update_section(out / "benchmarks.md", args.section, _markdown(results, meta, argv, stem))
    return 0


def _markdown(results, meta, argv, stem: str) -> str:
    words = sys.argv[1:] if argv is None else argv
    st, mc = meta["configs"]["self-training"], meta["configs"]["mcd"]
    cmd = shlex.join(["python", "benchmarks/short_adaptation.py", *words])
    lines = [
        "## Adaptation that pays off: accuracy against seconds"
        + ("" if stem == "short_adaptation" else f" ({stem.replace('_', ' ')})"),
        "",
        f"Written by `{cmd}`. Models: the shipped `default` and `mono` (`load_model(name)`). "
        f"Self-training (the default, `AdaptConfig()`): {st['steps']} steps of the heads, lr "
        f"{st['lr']:g}, batch {st['batch_size']}, pseudo-labels from the model's fields "
        f"refined by MIND-SSC Adam ({st['pseudo_levels']} levels, smoothness "
        f"{st['pseudo_smoothness']:g}), mirrored pairs; MCD (`AdaptConfig.mcd()`): "
        f"{mc['steps']} iterations, lr {mc['lr']:g}, batch {mc['batch_size']}, n = "
        f"{mc['generator_updates']}. Both keep the best weights by the MIND-SSC criterion on "
        f"a quarter of the target pairs held out (every {st['select_every']} and "
        f"{mc['select_every']} iterations). {meta['size']} x {meta['size']} px, "
        f"{meta['n_adapt']} unlabelled target pairs (training slices; a quarter of them held "
        f"out for the criterion, the rest adapted on), {meta['n_test']} "
        f"held-out test pairs per contrast (seed 123). CPU: {meta['machine']}. Seconds: wall time of "
        "`adapt_steps` from the call to its last record, selection criterion included. Network only "
        '(no refinement). "kept": the weights the keep-best rule returns; "best raw": the best '
        "evaluated snapshot of the run (test labels, for reference only).",
        "",
    ]
    for contrast, res in results.items():
        ident = res["rows"]["identity"]
        lines += [
            f"### T1 fixed vs {contrast.upper()}-like moving",
            "",
            "| row | seconds | kept iteration | label acc. | EPE (px) | EPE / identity | best raw acc. |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in res["rows"].items():
            lines.append(
                f"| {name} | 0 | - | {100 * row['label_accuracy']:.1f} % | {row['epe']:.2f} | {row['epe'] / ident['epe']:.2f} | - |"
            )
        for name, run in res["runs"].items():
            k = run["kept"]
            best_raw = max((c["accuracy"] for c in run["curve"]), default=float("nan"))
            lines.append(
                f"| {name} | {run['seconds']:.1f} | {run['kept_iteration']} | {100 * k['label_accuracy']:.1f} % | "
                f"{k['epe']:.2f} | {k['epe'] / ident['epe']:.2f} | {100 * best_raw:.1f} % |"
            )
        lines.append("")
    lines.append(f"![accuracy against seconds](images/{stem}.png)")
    return "\n".join(lines)


def _plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (contrast, res) in zip(axes[0], results.items(), strict=True):
        for name, run in res["runs"].items():
            xs = [c["seconds"] for c in run["curve"]]
            ys = [100 * c["accuracy"] for c in run["curve"]]
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        for name, row in res["rows"].items():
            style = ":" if name == "identity" else "--"
            ax.axhline(100 * row["label_accuracy"], ls=style, color="gray", lw=0.8, label=name)
        ax.axvline(30, color="red", lw=0.8, alpha=0.5)
        ax.set(
            title=f"T1 vs {contrast.upper()}-like",
            xlabel="wall-clock seconds (2 CPU cores)",
            ylabel="label accuracy (%)",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
