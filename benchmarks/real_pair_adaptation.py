"""A good model made better on the user's own pair: transductive adaptation on real stains.

    python benchmarks/real_pair_adaptation.py            # the real histology pairs
    python benchmarks/real_pair_adaptation.py --quick    # a smoke run of the same code path

For each real stain pair of the landmark benchmark (benchmarks/landmarks.py, the same
working size and landmarks): register with the default pipeline (affine pre-alignment,
then the shipped ``default`` network) and measure the median TRE; adapt a copy of the
network on that pair alone, as the Adaptation widget's "this pair" does (the fixed image
and the pre-aligned moving image cut into overlapping 192 px tiles,
:func:`~napari_discreg.core.learning.self_train.registered_pair_tiles`; a quarter of the tiles
held out for the keep-best criterion; no landmark is used); register again with the
adapted network and measure again. Both the default adaptation (self-training) and the
paper's MCD-pEMD are run. Writes the "real-pair-adaptation" section of
docs/benchmarks.md and docs/real_pair_adaptation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from _protocol import update_section

import napari_discreg as nd
from napari_discreg.core.config import AdaptConfig
from napari_discreg.core.learning.model import clone_model
from napari_discreg.core.learning.self_train import registered_pair_tiles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _landmark_data import PAIRS, default_data_dir, field_mapping, load_pairs, pair_metrics  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=448, help="long side of the fixed image (px)")
    ap.add_argument("--tile", type=int, default=192)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=DOCS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data_dir = args.data_dir or default_data_dir()
    pairs = load_pairs(data_dir, args.size, [s for s in PAIRS if s.real])
    methods = {
        "self-training (default)": ("pemd", AdaptConfig()),
        "MCD pEMD (the paper's)": ("pemd", AdaptConfig.mcd()),
    }
    if args.quick:
        methods = {
            k: (d, AdaptConfig.for_method(c.method, steps=2, select_every=1))
            for k, (d, c) in list(methods.items())[:1]
        }
    base = nd.load_model("default", device="cpu")
    rows = []
    for pair in pairs:
        before = nd.register(pair.fixed, pair.moving, model=base)
        start = pair_metrics(pair, field_mapping(before.displacement))
        tf, tm = registered_pair_tiles(pair.fixed, pair.moving, before.affine, size=args.tile)
        for name, (kind, cfg) in methods.items():
            model = clone_model(base)
            t0 = time.perf_counter()
            records = list(
                nd.adapt_steps(model, tf, tm, discrepancy=kind, config=cfg, device="cpu")
            )
            seconds = time.perf_counter() - t0
            after = nd.register(pair.fixed, pair.moving, model=model)
            end = pair_metrics(pair, field_mapping(after.displacement))
            row = {
                "pair": pair.name,
                "method": name,
                "tiles": int(tf.shape[0]),
                "seconds": seconds,
                "kept_iteration": records[-1].best_iteration,
                "criterion_start": records[0].criterion,
                "tre_before": start["median_tre"],
                "tre_after": end["median_tre"],
                "change": end["median_tre"] / start["median_tre"] - 1.0,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {
        "size": args.size,
        "tile": args.tile,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    if args.quick:
        return 0
    (args.out_dir / "real_pair_adaptation.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    update_section(
        args.out_dir / "benchmarks.md", "real-pair-adaptation", _markdown(rows, meta, argv)
    )
    return 0


def _markdown(rows, meta, argv) -> str:
    words = sys.argv[1:] if argv is None else argv
    cmd = shlex.join(["python", "benchmarks/real_pair_adaptation.py", *words])
    lines = [
        "## Adapting on the user's own pair: real stains, human landmarks",
        "",
        f"Written by `{cmd}`. Each real stain pair of the landmark benchmark at "
        f"{meta['size']} px (long side): registered with the default pipeline, then the "
        f"`default` network adapted on that pair alone (the fixed image and the pre-aligned "
        f"moving image in {meta['tile']} px tiles overlapping by half; a quarter held out for "
        "the keep-best criterion; no landmark used), then registered again. Median TRE in "
        f"pixels at working size. CPU: {meta['machine']}.",
        "",
        "| pair | adaptation | tiles | seconds | kept iteration | median TRE before | after | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['method']} | {r['tiles']} | {r['seconds']:.1f} | "
            f"{r['kept_iteration']} | {r['tre_before']:.2f} | {r['tre_after']:.2f} | "
            f"{100 * r['change']:+.1f} % |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
