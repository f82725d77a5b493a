"""Train the pretrained model shipped in src/napari_discreg/weights/ and record how.

    python scripts/train_shipped_model.py [--steps N] [--batch-size B] [--eval-pairs N]

Trains on mono-modal source pairs (T1<->T1, T2<->T2, PD<->PD) and as many
contrast-augmented pairs (TrainConfig.contrast_augmentation) from the training
slice range of the template, evaluates on held-out slices (mono-modal and
multi-modal, no adaptation) and writes the weights plus TRAINING.md / a JSON
record with the exact command, settings and measured numbers next to them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from napari_discreg.core.data import template as data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _protocol import update_section

from napari_discreg.core.config import DataConfig, ModelConfig, TrainConfig
from napari_discreg.core.files.checkpoint import DEFAULT_WEIGHTS, save_checkpoint
from napari_discreg.core.learning.evaluate import evaluate_model, identity_metrics, summarise
from napari_discreg.core.learning.model import DiscreteRegistrationNet
from napari_discreg.core.learning.train import train_steps

HEADER = "# The shipped pretrained models\n"
OUT = Path(__file__).resolve().parents[1] / "src" / "napari_discreg" / "weights"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-pairs", type=int, default=40)
    ap.add_argument("--out", type=Path, default=OUT / DEFAULT_WEIGHTS)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    mcfg, dcfg = ModelConfig(), DataConfig()
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model = DiscreteRegistrationNet(mcfg)
    t0 = time.perf_counter()
    bar = tqdm(train_steps(model, config=tcfg, data_config=dcfg, device="cpu"), total=tcfg.steps)
    for rec in bar:
        bar.set_postfix(loss=f"{rec.losses['loss']:.3f}", acc=f"{rec.losses['accuracy']:.2f}")
    train_seconds = time.perf_counter() - t0

    template = data.load_template(dcfg.size)
    evaluation = {}
    for fc, mc in (("t1", "t1"), ("t2", "t2"), ("t1", "t2"), ("t1", "pd")):
        pairs = data.fixed_test_pairs(
            template, dcfg, n=args.eval_pairs, fixed_contrast=fc, moving_contrast=mc, seed=123
        )
        evaluation[f"{fc}->{mc}"] = {
            "model": summarise(evaluate_model(model, pairs)),
            "identity": summarise(
                identity_metrics(pairs, mcfg.stride, mcfg.num_labels, mcfg.capture_range)
            ),
        }
    record = {
        "command": "python scripts/train_shipped_model.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "model_config": mcfg.to_dict(),
        "data_config": dcfg.to_dict(),
        "train_config": tcfg.to_dict(),
        "train_seconds": round(train_seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "evaluation_pairs": args.eval_pairs,
        "evaluation": evaluation,
    }
    save_checkpoint(model, args.out, extra={"training": record})
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [
        "## The default model",
        "",
        f"`{args.out.name}` was written by `{record['command']}` in {train_seconds / 60:.1f} min "
        f"on {record['machine']}.",
        "",
        "Source training only (no adaptation): mono-modal pairs of "
        f"{', '.join(tcfg.source_contrasts)}"
        + (
            " and as many pairs of two random contrasts (contrast augmentation)"
            if tcfg.contrast_augmentation
            else ""
        )
        + f" from template slices {dcfg.train_slices}; evaluated on "
        f"{args.eval_pairs} held-out pairs from slices {dcfg.test_slices} (seed 123).",
        "",
        "| pairs (fixed->moving) | label acc. identity | label acc. model | EPE identity (px) | EPE model (px) |",
        "|---|---|---|---|---|",
    ]
    for name, ev in evaluation.items():
        lines.append(
            f"| {name} | {100 * ev['identity']['label_accuracy']:.1f} % | {100 * ev['model']['label_accuracy']:.1f} % | "
            f"{ev['identity']['epe']:.2f} | {ev['model']['epe']:.2f} |"
        )
    lines += [
        "",
        "Settings: see the JSON file beside this one (also stored in the checkpoint's metadata).",
    ]
    # only this script's section: the page also holds the adapted models' section
    update_section(args.out.parent / "TRAINING.md", "default", "\n".join(lines), header=HEADER)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
