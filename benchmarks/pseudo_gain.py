"""How much self-training's pseudo-labels improve on a model's own fields: the gate.

    python benchmarks/pseudo_gain.py

Self-training learns the model's fields refined by MIND-SSC instance optimisation; where
the refinement barely improves them, the model already does what it would learn, and the
refined fields can be further from the truth than the model (the shipped ``default``
model: 0.43 -> 0.51 px after self-training, ``benchmarks/adaptation_recipes.py --model
default``). ``core.learning.self_train.pseudo_labels`` measures this gain, ``1 - d(refined) /
d(model)`` with ``d`` the MIND-SSC distance of fixed and warped moving over the
foreground, and ``AdaptConfig.min_pseudo_gain`` is the gate. This script measures the
gain for both shipped models on the template's target pairs (as the adaptation benchmark
makes them, 192 px) and for the ``default`` model on the tiles of the real stain pairs
after the default pre-alignment, and writes the "pseudo-gain" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch
from _protocol import adaptation_pairs, update_section

import napari_discreg as nd
from napari_discreg.core.config import AdaptConfig, DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.learning.self_train import pseudo_labels, registered_pair_tiles
from napari_discreg.core.registration.predict import prepare_target

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _landmark_data import PAIRS, default_data_dir, load_pairs  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def gain(model, fixed, moving) -> float:
    tf, tm, mask = prepare_target(fixed, moving, model.config.stride, torch.device("cpu"))
    return pseudo_labels(model, tf, tm, AdaptConfig(), mask)[1]


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else argv
    rows = []
    dcfg = DataConfig(size=192)
    template = data.load_template(dcfg.size)
    for name in ("mono", "default"):
        model = nd.load_model(name, device="cpu")
        for contrast in ("t2", "pd"):
            f, m = adaptation_pairs(template, dcfg, n=8, moving_contrast=contrast)
            rows.append(
                (name, f"8 template pairs, T1 vs {contrast.upper()}-like", gain(model, f, m))
            )
    base = nd.load_model("default", device="cpu")
    for pair in load_pairs(default_data_dir(), 448, [s for s in PAIRS if s.real]):
        result = nd.register(pair.fixed, pair.moving, model=base)
        f, m = registered_pair_tiles(pair.fixed, pair.moving, result.affine)
        rows.append(
            ("default", f"{pair.name}: {f.shape[0]} tiles after pre-alignment", gain(base, f, m))
        )
    gate = AdaptConfig().min_pseudo_gain
    lines = [
        "## Self-training's gate: the refinement's gain over the model's own fields",
        "",
        f"Written by `{shlex.join(['python', 'benchmarks/pseudo_gain.py', *words])}`. Gain: "
        "`1 - d(refined) / d(model)`, `d` the MIND-SSC distance of fixed and warped moving "
        "over the foreground, averaged over the pairs (`core.learning.self_train.pseudo_labels`). "
        f"Self-training runs when the gain is at least {gate:.2f} "
        "(`AdaptConfig.min_pseudo_gain`); below it the model is kept as it is.",
        "",
        "| model | pairs | gain | self-training |",
        "|---|---|---|---|",
    ]
    for name, what, g in rows:
        lines.append(f"| {name} | {what} | {g:.3f} | {'runs' if g >= gate else 'skipped'} |")
        print(lines[-1], flush=True)
    update_section(DOCS / "benchmarks.md", "pseudo-gain", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
