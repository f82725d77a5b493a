"""Adapt the default shipped model offline to T2-like and PD-like targets and record how.

    python scripts/adapt_shipped_models.py [--contrasts t2 pd] [--steps N] [--n-adapt N]

For each target contrast: MCD adaptation of the default shipped model (no labels of
the target are read) on ``--n-adapt`` unlabelled T1 vs target pairs from the
template's training slices, with a long budget, the keep-best rule of
``AdaptConfig`` choosing the weights on those unlabelled pairs. Evaluated on held-out
test pairs (slices the adaptation never saw, seed 123) before and after. Writes
the record ``src/napari_discreg/weights/discreg_t1_to_<contrast>.json`` and the "adapted"
section of TRAINING.md; the weights ``discreg_t1_to_<contrast>.safetensors`` only when
the keep-best rule kept weights other than the starting ones (a copy of the default
model would add megabytes and nothing else). Add a saved model to
``core.config.SHIPPED_MODELS`` to offer it by name in ``load_model`` and the widget.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from napari_discreg.core.data import template as data
from napari_discreg.core.learning.adapt import adapt_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _protocol import adaptation_pairs, update_section

from napari_discreg.core.config import SHIPPED_MODELS, AdaptConfig, DataConfig
from napari_discreg.core.files.checkpoint import load_model, save_checkpoint, shipped_model_path
from napari_discreg.core.learning.evaluate import evaluate_model, identity_metrics, summarise
from napari_discreg.core.learning.model import clone_model

WEIGHTS = shipped_model_path("default").parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--contrasts", nargs="+", default=["t2", "pd"], choices=["t2", "pd"])
    ap.add_argument("--discrepancy", default="pemd")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--generator-updates", type=int, default=2)
    ap.add_argument("--select-every", type=int, default=10)
    ap.add_argument("--n-adapt", type=int, default=64)
    ap.add_argument("--eval-pairs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-5, help="a converged model needs a small one")
    ap.add_argument("--out-dir", type=Path, default=WEIGHTS)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dcfg = DataConfig()
    template = data.load_template(dcfg.size)
    acfg = replace(
        AdaptConfig.mcd(),
        steps=args.steps,
        batch_size=args.batch_size,
        generator_updates=args.generator_updates,
        select_every=args.select_every,
        lr=args.lr,
    )
    source = load_model("default", device="cpu")
    mc = source.config
    command = "python scripts/adapt_shipped_models.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    for contrast in args.contrasts:
        name = f"t1-to-{contrast}"
        out = args.out_dir / f"discreg_t1_to_{contrast}.safetensors"
        af, am = adaptation_pairs(template, dcfg, n=args.n_adapt, moving_contrast=contrast)
        test = data.fixed_test_pairs(
            template,
            dcfg,
            n=args.eval_pairs,
            fixed_contrast="t1",
            moving_contrast=contrast,
            seed=123,
        )
        before = summarise(evaluate_model(source, test))
        identity = summarise(identity_metrics(test, mc.stride, mc.num_labels, mc.capture_range))
        model = clone_model(source)
        t0 = time.perf_counter()
        criterion = []
        bar = tqdm(
            adapt_steps(model, af, am, discrepancy=args.discrepancy, config=acfg, device="cpu"),
            total=acfg.steps + 1,
            desc=name,
        )
        for rec in bar:
            if rec.criterion is not None:
                criterion.append({"iteration": rec.iteration, "criterion": rec.criterion})
            kept = rec.best_iteration
        seconds = time.perf_counter() - t0
        after = summarise(evaluate_model(model, test))
        record = {
            "command": command,
            "source_model": SHIPPED_MODELS["default"][0],
            "target": f"t1->{contrast}",
            "discrepancy": args.discrepancy,
            "adapt_config": acfg.to_dict(),
            "data_config": dcfg.to_dict(),
            "n_adapt": args.n_adapt,
            "adapt_seconds": round(seconds, 1),
            "kept_iteration": kept,
            "criterion_curve": criterion,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "evaluation_pairs": args.eval_pairs,
            "evaluation": {"before": before, "after": after, "identity": identity},
        }
        record["saved"] = kept != 0
        if record["saved"]:
            save_checkpoint(model, out, extra={"adaptation": record})
        out.with_suffix(".json").write_text(json.dumps(record, indent=2))
        print(name, "before", before, "after", after, "identity", identity, flush=True)
    update_section(args.out_dir / "TRAINING.md", "adapted", markdown(args.out_dir), header="")
    return 0


def markdown(folder: Path) -> str:
    """The "adapted" section of TRAINING.md, from the records of every adapted model there."""
    lines = [
        "## The adapted models",
        "",
        "Written by `scripts/adapt_shipped_models.py` (the command is in each record): the "
        "default model adapted by MCD on unlabelled T1 vs target pairs from the template's "
        "training slices, the keep-best rule choosing the weights on those unlabelled pairs; "
        "evaluated before and after on held-out test pairs (seed 123), network only. Seconds: "
        "wall time on the machine in the record (with --threads, a machine shared with other jobs).",
        "",
        "| model | command | discrepancy | iterations (batch, n) | seconds | kept iteration | "
        "label acc. before | after | EPE before (px) | after | identity | weights shipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("discreg_t1_to_*.json")):
        name = "t1-to-" + path.stem.rsplit("_", 1)[-1]
        r = json.loads(path.read_text())
        a, ev = r["adapt_config"], r["evaluation"]
        lines.append(
            f"| `{name}` | `{r['command']}` | {r['discrepancy']} | {a['steps']} ({a['batch_size']}, "
            f"{a['generator_updates']}), lr {a['lr']:g} | {r['adapt_seconds']:.0f} | {r['kept_iteration']} | "
            f"{100 * ev['before']['label_accuracy']:.1f} % | {100 * ev['after']['label_accuracy']:.1f} % | "
            f"{ev['before']['epe']:.2f} | {ev['after']['epe']:.2f} | {ev['identity']['epe']:.2f} | "
            f"{'yes' if r.get('saved', True) else 'no: identical to the default'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
