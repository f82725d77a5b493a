"""Never worse than identity? Every shipped model, network only, on cross-contrast pairs.

    python benchmarks/transfer.py            # 4 pairs per kind
    python benchmarks/transfer.py --quick    # 1 pair per kind

Pairs, each with a known smooth field (``core.data.template.random_field``, largest magnitude
2.5-5 px, the training distribution's): the README's sample pair (T1 vs T2-like, the
napari sample), held-out template pairs T1 vs T2-like and T1 vs PD-like at 192 x 192,
and three stain pairs from scikit-image's immunohistochemistry image (not a brain,
not MRI, never seen in training): colour deconvolution (``skimage.color.rgb2hed``)
into hematoxylin, eosin and DAB, 192 x 192 crops, fixed = one channel warped by the
field, moving = the other channel. EPE over the whole image (template pairs: the
brain mask), network only (no refinement), against identity's EPE on the same pairs.
Writes the "transfer" section of docs/benchmarks.md and docs/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from _protocol import update_section
from skimage import color
from skimage import data as skdata

import napari_discreg as nd
from napari_discreg._sample_data import multimodal_pair
from napari_discreg.core.config import SHIPPED_MODELS, DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files.checkpoint import shipped_model_path
from napari_discreg.core.registration.metrics import end_point_error

DOCS = Path(__file__).resolve().parents[1] / "docs"
SIZE = 192


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [1, 99])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def stain_pairs(fixed: str, moving: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` IHC crops: fixed = channel ``fixed`` warped by a random field, moving =
    channel ``moving`` (``"h"``, ``"e"``, ``"d"`` of rgb2hed, or ``"gray"``)."""
    rgb = skdata.immunohistochemistry()
    hed = color.rgb2hed(rgb)
    channels = {
        "h": hed[..., 0],
        "e": hed[..., 1],
        "d": hed[..., 2],
        "gray": color.rgb2gray(rgb),
    }
    cfg = DataConfig(size=SIZE)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r, c = rng.integers(0, rgb.shape[0] - SIZE, size=2)
        crop = (slice(r, r + SIZE), slice(c, c + SIZE))
        a, b = _normalise(channels[fixed][crop]), _normalise(channels[moving][crop])
        zero = np.zeros_like(a)
        f, m, u = data.deform_pair(a, zero, b, zero, rng, cfg)
        out.append({"fixed": f, "moving": m, "truth": u, "mask": None})
    return out


def template_pairs(moving: str, n: int) -> list[dict]:
    cfg = DataConfig(size=SIZE)
    pairs = data.fixed_test_pairs(
        data.load_template(SIZE), cfg, n=n, fixed_contrast="t1", moving_contrast=moving, seed=123
    )
    return [
        {"fixed": p.fixed, "moving": p.moving, "truth": p.displacement, "mask": p.mask > 0}
        for p in pairs
    ]


def sample_pair() -> list[dict]:
    layers = multimodal_pair()
    fixed, moving = layers[0][0], layers[1][0]
    return [
        {
            "fixed": fixed,
            "moving": moving,
            "truth": layers[1][1]["metadata"]["true_displacement"],
            "mask": layers[2][0] > 0,  # the brain (fixed tissue labels), as for template pairs
        }
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=4, help="pairs per kind (the sample is one pair)")
    ap.add_argument("--out-dir", type=Path, default=DOCS)
    args = ap.parse_args(argv)
    n = 1 if args.quick else args.n
    kinds = {
        "README sample: T1 vs T2-like": sample_pair(),
        "template: T1 vs T2-like": template_pairs("t2", n),
        "template: T1 vs PD-like": template_pairs("pd", n),
        "IHC: hematoxylin vs DAB": stain_pairs("h", "d", n),
        "IHC: gray vs hematoxylin": stain_pairs("gray", "h", n),
        "IHC: eosin vs hematoxylin": stain_pairs("e", "h", n),
    }
    models = [name for name in SHIPPED_MODELS if shipped_model_path(name).is_file()]
    results: dict = {}
    for kind, pairs in kinds.items():
        row = {
            "identity": float(
                np.mean([end_point_error(0 * p["truth"], p["truth"], p["mask"]) for p in pairs])
            )
        }
        fallbacks = {}
        for name in models:
            model = nd.load_model(name, device="cpu")
            for guard in (False, True):
                out = [
                    nd.register(
                        p["fixed"],
                        p["moving"],
                        model=model,
                        guard=guard,
                        method="network",
                        prealign="none",
                    )
                    for p in pairs
                ]
                key = f"{name}, register()" if guard else name
                row[key] = float(
                    np.mean(
                        [
                            end_point_error(r.displacement, p["truth"], p["mask"])
                            for r, p in zip(out, pairs, strict=True)
                        ]
                    )
                )
                if guard:
                    fallbacks[name] = sum(r.identity_fallback for r in out)
        results[kind] = {"pairs": len(pairs), "epe": row, "fallbacks": fallbacks}
        print(kind, {k: round(v, 2) for k, v in row.items()}, flush=True)
    (args.out_dir / "transfer.json").write_text(
        json.dumps({"models": models, "results": results}, indent=1)
    )
    update_section(args.out_dir / "benchmarks.md", "transfer", markdown(results, models, argv))
    return 0


def markdown(results: dict, models: list[str], argv) -> str:
    words = sys.argv[1:] if argv is None else argv
    cmd = shlex.join(["python", "benchmarks/transfer.py", *words])
    lines = [
        "## Cross-contrast pairs before adaptation: never worse than identity?",
        "",
        f"Written by `{cmd}`. Mean EPE in px (no refinement) of every shipped model "
        "(`load_model(name)`, see TRAINING.md), and in brackets its ratio to identity's EPE on "
        "the same pairs; known smooth fields of at most 5 px, so no pre-alignment "
        '(`prealign="none", method="network"`). "network": the network\'s field '
        '(`guard=False`); "register()": with the default guard, which keeps the '
        "network's field only where it matches the pair better than no motion by the MIND-SSC "
        "distance (the count of pairs that fell back to identity follows the slash). The stain "
        "pairs come from scikit-image's immunohistochemistry image, a domain no model saw "
        "(rgb2hed channels, 192 x 192 crops).",
        "",
        "| pairs | n | identity | "
        + " | ".join(f"{m}: network | {m}: register()" for m in models)
        + " |",
        "|---|---|---|" + "---|---|" * len(models),
    ]
    for kind, r in results.items():
        e, fb = r["epe"], r["fallbacks"]
        cells = []
        for m in models:
            g = e[f"{m}, register()"]
            cells += [
                f"{e[m]:.2f} ({e[m] / e['identity']:.2f})",
                f"{g:.2f} ({g / e['identity']:.2f}) / {fb[m]}",
            ]
        lines.append(f"| {kind} | {r['pairs']} | {e['identity']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
