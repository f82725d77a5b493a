"""Adaptation recipes for the network stage on one real stain pair (issue 25, item 2): a sweep.

    python benchmarks/real_pair_recipes.py --list
    python benchmarks/real_pair_recipes.py --pairs rat-kidney --recipes "mind heads" \
        --out /tmp/dev/real_recipes/rat.json

For each real stain pair of the landmark benchmark (``benchmarks/landmarks.py``: 448 px,
human landmarks), the default pipeline registers the pair with the shipped ``default``
network; a copy of the network is then adapted on that pair alone by a recipe, and at
every checkpoint the pair is registered again with the current weights. What is written
per checkpoint: the median TRE of the default pipeline (landmarks: for the report only,
no recipe reads them) and the unsupervised keep-best criterion (MIND-SSC similarity of
the held-out tiles, what a run would select by).

Target pairs: the fixed image and the moving image after the pre-alignment
(``tiles="prealigned"``, :func:`registered_pair_tiles`) or after the whole default
registration (``tiles="registered"``: the residual motion the finest pass sees), in
192 px tiles overlapping by half; a quarter of them held out for the criterion.

Recipe kinds (all on the tiles, no label of any kind):

* ``mind``: the network's expected (soft-argmax) field of the mean head warps the moving
  tile; the loss is the MIND-SSC distance of fixed and warped over the foreground plus a
  diffusion regulariser of the control-point field (the unsupervised loss of PDD-Net),
  optionally plus the heads' p-EMD discrepancy. ``params``: ``heads`` (both heads
  without their first layer, as self-training), ``norm`` (the instance norms' scale and
  shift in G), ``G`` or ``all``.
* ``tent``: entropy of the mean head's histogram over the foreground control points
  (Wang et al., ICLR 2021), on ``params``.
* ``shipped``: :func:`adapt_steps` with an :class:`AdaptConfig` (overrides in ``cfg``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _protocol import update_section

import napari_discreg as nd
from napari_discreg.core.config import AdaptConfig
from napari_discreg.core.learning.adapt import holdout_split
from napari_discreg.core.learning.discrepancy import discrepancy_fn
from napari_discreg.core.learning.model import clone_model, probabilities
from napari_discreg.core.learning.self_train import (
    registered_pair_tiles,
    tile_starts,
    trainable_parameters,
)
from napari_discreg.core.registration.label_grid import expected_displacement
from napari_discreg.core.registration.mind import mind_ssc
from napari_discreg.core.registration.prealign import tissue_image, to_gray
from napari_discreg.core.registration.predict import prepare_target, selection_criterion
from napari_discreg.core.registration.warp import upsample_field, warp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _landmark_data import PAIRS, default_data_dir, field_mapping, load_pairs, pair_metrics  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"

RECIPES: dict[str, dict] = {
    "mind heads": {"kind": "mind", "params": "heads", "lr": 1e-3},
    "mind heads lr3e-4": {"kind": "mind", "params": "heads", "lr": 3e-4},
    "mind norm": {"kind": "mind", "params": "norm", "lr": 1e-3},
    "mind G": {"kind": "mind", "params": "G", "lr": 1e-4},
    "mind all": {"kind": "mind", "params": "all", "lr": 1e-4},
    "mind all lr3e-5": {"kind": "mind", "params": "all", "lr": 3e-5},
    "mind all smooth1": {"kind": "mind", "params": "all", "lr": 1e-4, "smooth": 1.0},
    "mind all +disc": {"kind": "mind", "params": "all", "lr": 1e-4, "disc_weight": 1.0},
    "mind heads registered": {"kind": "mind", "params": "heads", "lr": 1e-3, "tiles": "registered"},
    "mind all registered": {"kind": "mind", "params": "all", "lr": 1e-4, "tiles": "registered"},
    "tent norm": {"kind": "tent", "params": "norm", "lr": 1e-3},
    "tent all": {"kind": "tent", "params": "all", "lr": 1e-4},
    "selftrain ungated": {"kind": "shipped", "cfg": {"min_pseudo_gain": 0.0}},
    "distill ensemble": {"kind": "distill", "lr": 3e-3},
    "distill ensemble lr5e-4": {"kind": "distill", "lr": 5e-4},
    "distill ensemble multiscale": {"kind": "distill", "lr": 3e-3, "scales": (1, 2, 4)},
    "mcd": {"kind": "shipped", "cfg": {"method": "mcd"}},
}


def _params(model, which: str) -> list[torch.nn.Parameter]:
    if which == "heads":
        chosen = trainable_parameters(model)
    elif which == "norm":
        chosen = [
            p
            for m in model.G.modules()
            if isinstance(m, torch.nn.InstanceNorm2d)
            for p in m.parameters()
        ]
    elif which == "G":
        chosen = list(model.G.parameters())
    elif which == "all":
        chosen = list(model.parameters())
    else:
        raise ValueError(which)
    ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return chosen


def _field(model, logits, shape):
    l1, l2 = logits
    prob = 0.5 * (probabilities(l1) + probabilities(l2))
    cp = expected_displacement(prob, model.offsets)
    return prob, cp, upsample_field(cp, model.config.stride, shape)


def mind_loss(model, f, m, mask, smooth: float, disc_weight: float, dfun):
    logits = model.heads(model.cost_volume(f, m))
    _, cp, dense = _field(model, logits, tuple(f.shape[-2:]))
    diff = (mind_ssc(f) - mind_ssc(warp(m, dense))).pow(2).mean(1, keepdim=True)
    sim = (diff * mask).sum() / mask.sum().clamp_min(1.0)
    reg = (cp[..., 1:, :] - cp[..., :-1, :]).pow(2).mean() + (cp[..., :, 1:] - cp[..., :, :-1]).pow(
        2
    ).mean()
    loss = sim + smooth * reg
    if disc_weight > 0:
        fg = F.max_pool2d(mask, model.config.stride)[:, 0] > 0
        h, w = logits[0].shape[1:3]
        fg = fg[:, :h, :w]
        loss = loss + disc_weight * dfun(probabilities(logits[0])[fg], probabilities(logits[1])[fg])
    return loss


def tent_loss(model, f, m, mask):
    logits = model.heads(model.cost_volume(f, m))
    prob, _, _ = _field(model, logits, tuple(f.shape[-2:]))
    fg = F.max_pool2d(mask, model.config.stride)[:, 0] > 0
    h, w = prob.shape[1:3]
    p = prob[fg[:, :h, :w]].flatten(1)
    return -(p * p.clamp_min(1e-8).log()).sum(-1).mean()


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, (-2, -1))


def _field_back(d: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """A field computed on ``_dihedral(pair, k, flip)``, in the pair's own frame."""
    d = torch.rot90(d, -k, (-2, -1))
    r, c = d[:, 0], d[:, 1]
    for _ in range(k % 4):
        r, c = c, -r
    d = torch.stack([r, c], 1)
    if flip:
        d = d.flip(-1)
        d = torch.stack([d[:, 0], -d[:, 1]], 1)
    return d


@torch.no_grad()
def dihedral_fields(model, fi: torch.Tensor, mi: torch.Tensor) -> list[torch.Tensor]:
    """The network stage's coarse-to-fine fields of the 8 rotations and mirrorings of the
    pre-aligned pair, each mapped back to the pair's frame (the first: the pair as it is)."""
    from napari_discreg.core.registration.register import network_coarse_to_fine

    return [
        _field_back(
            network_coarse_to_fine(model, _dihedral(fi, k, fl), _dihedral(mi, k, fl))[0], k, fl
        )
        for fl in (False, True)
        for k in range(4)
    ]


def ensemble_field(model, fi: torch.Tensor, mi: torch.Tensor) -> torch.Tensor:
    """The mean of :func:`dihedral_fields`: the teacher of ``distill``."""
    return torch.stack(dihedral_fields(model, fi, mi)).mean(0)


def prealigned_inputs(pair, result) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pre-alignment's positions and the network's normalised (1, 1, H, W) inputs
    after the pre-alignment of ``result``, as :func:`register` makes them."""
    from napari_discreg.core.registration.register import _prealigned_pair

    f = tissue_image(to_gray(pair.fixed))
    m = tissue_image(to_gray(pair.moving))
    return _prealigned_pair(f, m, result.affine, 1, "cpu")


def spread(pair, base) -> dict:
    """How much the pipeline's median TRE moves when nothing is learned: the network stage
    of the unchanged model on each rotation/mirroring of the pre-aligned pair (the same
    information, another orientation), and on their mean field."""
    from napari_discreg.core.registration.register import _compose
    from napari_discreg.core.registration.warp import pixel_grid

    result = nd.register(pair.fixed, pair.moving, model=base)
    start, fi, mi = prealigned_inputs(pair, result)
    h, w = fi.shape[-2:]

    def tre(dense: torch.Tensor) -> float:
        disp = (_compose(start, result.affine, dense) - pixel_grid(h, w)[None])[0].numpy()
        return pair_metrics(pair, field_mapping(disp))["median_tre"]

    fields = dihedral_fields(base, fi, mi)
    return {
        "pipeline": pair_metrics(pair, field_mapping(result.displacement))["median_tre"],
        "variants": [tre(d) for d in fields],
        "mean_field": tre(torch.stack(fields).mean(0)),
    }


def _tile_tensor(x: torch.Tensor, size: int = 192, overlap: float = 0.5) -> torch.Tensor:
    """(1, C, H, W) -> (N, C, size, size): the tiles of :func:`registered_pair_tiles`
    (zero-padded where the image is smaller than a tile)."""
    h, w = x.shape[-2:]
    out = []
    for r in tile_starts(h, size, overlap):
        for c in tile_starts(w, size, overlap):
            t = x.new_zeros(x.shape[0], x.shape[1], size, size)
            p = x[..., r : r + size, c : c + size]
            t[..., : p.shape[-2], : p.shape[-1]] = p
            out.append(t)
    return torch.cat(out)


def distill_trainer(pair, result, model, opts: dict, seed: int):
    """Self-training whose pseudo-labels are the ensemble field of the pair (no
    refinement), on the pre-aligned pair's tiles (at ``scales``, as the coarse-to-fine
    passes see it first). It learns every tile, the criterion's held-out ones included:
    its teacher has seen the whole pair anyway."""
    from napari_discreg.core.config import FOREGROUND_THRESHOLD
    from napari_discreg.core.learning.self_train import SelfTraining
    from napari_discreg.core.registration.label_grid import soft_labels
    from napari_discreg.core.registration.register import _downsample
    from napari_discreg.core.registration.warp import control_point_field

    _, fi, mi = prealigned_inputs(pair, result)
    teacher = ensemble_field(model, fi, mi)
    tf, tm, tt = [], [], []
    for fac in opts.get("scales", (1,)):
        fd, md = _downsample(fi, fac), _downsample(mi, fac)
        td = F.interpolate(teacher, size=fd.shape[-2:], mode="bilinear", align_corners=False) / fac
        tf.append(_tile_tensor(fd))
        tm.append(_tile_tensor(md))
        tt.append(_tile_tensor(td))
    tf, tm, tt = torch.cat(tf), torch.cat(tm), torch.cat(tt)
    mc = model.config
    mask = ((tf > FOREGROUND_THRESHOLD) | (tm > FOREGROUND_THRESHOLD)).float()
    targets = soft_labels(control_point_field(tt, mc.stride), mc.num_labels, mc.capture_range)
    cfg = AdaptConfig(lr=opts["lr"])
    trainer = SelfTraining(
        model, tf, tm, mask, cfg, np.random.default_rng(seed), targets=targets.flatten(-2)
    )
    return trainer


def registered_tiles(pair, result, size: int):
    """The fixed image and the moving image warped by the whole registration, in tiles."""
    from napari_discreg.core.registration.review import warp_to_grid

    f = tissue_image(to_gray(pair.fixed))
    warped = warp_to_grid(tissue_image(to_gray(pair.moving)), result.displacement, order=1)
    return registered_pair_tiles(f, warped, np.eye(3), size=size)


def run(pair, base, name: str, opts: dict, steps: int, checkpoints: list[int], seed: int, log):
    before = nd.register(pair.fixed, pair.moving, model=base)
    if opts.get("tiles", "prealigned") == "registered":
        tf, tm = registered_tiles(pair, before, 192)
    else:
        tf, tm = registered_pair_tiles(pair.fixed, pair.moving, before.affine, size=192)
    model = clone_model(base)
    ft, mt, mask = prepare_target(tf, tm, model.config.stride, torch.device("cpu"))
    train_idx, sel_idx = holdout_split(ft.shape[0], 0.25, seed)
    sel = (ft[sel_idx], mt[sel_idx], mask[sel_idx])
    rows = []

    def evaluate(step: int, seconds: float) -> None:
        model.eval()
        with torch.no_grad():
            crit = selection_criterion(model, *sel)
        res = nd.register(pair.fixed, pair.moving, model=model)
        met = pair_metrics(pair, field_mapping(res.displacement))
        rows.append(
            {
                "step": step,
                "seconds": seconds,
                "criterion": crit,
                "pipeline_mind": res.quality["mind_after"],
                "fallback": bool(res.identity_fallback),
                "median_tre": met["median_tre"],
                "mean_tre": met["mean_tre"],
            }
        )
        log(
            f"{pair.name} | {name} | step {step} | crit {crit:.5f} | pipeline MIND "
            f"{res.quality['mind_after']:.5f}{' fallback' if res.identity_fallback else ''} | "
            f"TRE {met['median_tre']:.3f} (mean {met['mean_tre']:.3f}) | {seconds:.1f} s"
        )

    evaluate(0, 0.0)
    if opts["kind"] == "shipped":
        cfg = AdaptConfig.for_method(
            opts["cfg"].get("method", "self-training"),
            **{k: v for k, v in opts["cfg"].items() if k != "method"},
        )
        t0 = time.perf_counter()
        records = list(nd.adapt_steps(model, tf, tm, config=cfg, device="cpu"))
        evaluate(records[-1].best_iteration, time.perf_counter() - t0)
        return {"rows": rows, "kept": records[-1].best_iteration}
    if opts["kind"] == "distill":
        t0 = time.perf_counter()
        trainer = distill_trainer(pair, before, model, opts, seed)
        opt = trainer.optimizers(opts["lr"])["heads"]
        spent = time.perf_counter() - t0
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            trainer.freeze(True)
            model.train()
            trainer.step(opt)
            trainer.freeze(False)
            spent += time.perf_counter() - t0
            if step in checkpoints:
                evaluate(step, spent)
        return {"rows": rows}
    rng = np.random.default_rng(seed)
    params = _params(model, opts["params"])
    opt = torch.optim.Adam(params, lr=opts["lr"])
    dfun = discrepancy_fn("pemd", diagonals=True)
    batch = opts.get("batch", 2)
    spent = 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        model.train()
        idx = torch.from_numpy(
            rng.choice(train_idx, size=min(batch, len(train_idx)), replace=False)
        )
        f, m, k = ft[idx], mt[idx], mask[idx]
        if opts["kind"] == "mind":
            loss = mind_loss(
                model, f, m, k, opts.get("smooth", 0.1), opts.get("disc_weight", 0.0), dfun
            )
        else:
            loss = tent_loss(model, f, m, k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        spent += time.perf_counter() - t0
        if step in checkpoints:
            for p in model.parameters():
                p.requires_grad_(True)
            evaluate(step, spent)
            _params(model, opts["params"])
    return {"rows": rows}


def keep_best(rows: list[dict]) -> tuple[dict, dict | None]:
    """What a run keeps: by the held-out tiles' criterion alone (the checkpoint with the
    best criterion, the start included), and then after the registered pair's check
    (that checkpoint only if the pipeline's MIND-SSC distance on the pair is lower than
    the start's, ``None`` when the rows do not have it)."""
    best = max(rows, key=lambda r: r["criterion"])
    if "pipeline_mind" not in rows[0]:
        return best, None
    checked = best if best["pipeline_mind"] < rows[0]["pipeline_mind"] else rows[0]
    return best, checked


def markdown(results: dict) -> str:
    """The sweep's curves: per recipe and pair, the pipeline's median TRE and the held-out
    tiles' criterion at every checkpoint, and what keep-best keeps without and with the
    registered pair's check."""
    lines = [
        "## Adapting the network stage on one real pair: recipes (issue 25, item 2)",
        "",
        "Written by runs of `python benchmarks/real_pair_recipes.py [--pairs P] [--recipes R "
        "...] [--checkpoints N ...] --out FILE` (1 torch thread; the default checkpoints 10, "
        "25, 50 and 100, the `distill`, `mind all`, `mind all +disc`, `mind G` and `tent all` runs also at 5) "
        "and `--spread --out FILE`, rendered by `--write FILE ...` (a later file's run of a "
        "recipe on a pair replaces an earlier one). The default pipeline's median TRE (px, "
        "448 px working size, human landmarks read for this table only) at each checkpoint "
        "of a recipe run on the pair's own 192 px tiles after the pre-alignment; in brackets "
        "the held-out tiles' MIND-SSC criterion (higher is better) that keep-best selects "
        "by, and the pipeline's own MIND-SSC distance on the whole pair (lower is better; "
        "`network_stage_distance`, what `register()` reports as `quality['mind_after']`). "
        '"tiles": what keep-best by the criterion alone keeps; "+ pair check": what the '
        "product keeps since the registered pair judges the candidate "
        "(`ArrayTargets.registered`: the start unless the pair matches better). Start: the "
        "shipped `default` network (rat-kidney 1.19 px, lung-lesion 2.52 px); the "
        "pre-alignment alone gives 1.61 and 3.61 px, where a run lands when the guard "
        "rejects the adapted network's field.",
        "",
        "| recipe | pair | TRE (criterion / pipeline distance) at steps | tiles: step, TRE, change | + pair check: step, TRE, change |",
        "|---|---|---|---|---|",
    ]
    spreads = {k: v for k, v in results.items() if k.startswith("spread |")}
    for key, res in results.items():
        if key in spreads:
            continue
        pair, name = (part.strip() for part in key.split("|", 1))
        rows = res["rows"]

        def point(r: dict) -> str:
            extra = f" / {r['pipeline_mind']:.4f}" if "pipeline_mind" in r else ""
            return f"{r['step']}: {r['median_tre']:.2f} ({r['criterion']:.4f}{extra})"

        def kept(r: dict | None, start: float = rows[0]["median_tre"]) -> str:
            if r is None:
                return "-"
            change = r["median_tre"] / start - 1.0
            return f"{r['step']}, {r['median_tre']:.2f}, {100 * change:+.1f} %"

        best, checked = keep_best(rows)
        curve = ", ".join(point(r) for r in rows)
        lines.append(f"| {name} | {pair} | {curve} | {kept(best)} | {kept(checked)} |")
    changes = {"tiles": [], "check": []}
    lowest: dict[str, tuple[float, str]] = {}
    for key, res in results.items():
        if key in spreads:
            continue
        pair, name = (part.strip() for part in key.split("|", 1))
        rows = res["rows"]
        best, checked = keep_best(rows)
        start = rows[0]["median_tre"]
        changes["tiles"].append((best["median_tre"] / start - 1.0, f"{name}, {pair}"))
        if checked is not None:
            changes["check"].append((checked["median_tre"] / start - 1.0, f"{name}, {pair}"))
        low = min(rows, key=lambda r: r["median_tre"])
        if pair not in lowest or low["median_tre"] < lowest[pair][0]:
            lowest[pair] = (low["median_tre"], f"{name}, step {low['step']}")
    worst = [("tiles alone", *max(changes["tiles"]))]
    if changes["check"]:
        worst.append(("with the pair check", *max(changes["check"])))
    summary = [
        f"{len(changes['tiles'])} runs. The worst change of what keep-best keeps: "
        + "; ".join(f"{label} {100 * c:+.1f} % ({where})" for label, c, where in worst)
        + ". The lowest TRE at any checkpoint (found with the landmarks, which no run may "
        "use): "
        + "; ".join(f"{pair} {tre:.2f} px ({where})" for pair, (tre, where) in lowest.items())
        + "."
    ]
    lines += ["", *summary]
    if spreads:
        lines += [
            "",
            "What the TRE does when nothing is learned (`--spread`): the unchanged network "
            "stage on the 8 rotations and mirrorings of the pre-aligned pair, each field "
            "mapped back, and on their mean field (the teacher the `distill` recipes learn).",
            "",
            "| pair | pipeline | the 8 orientations: min - max (median) | mean field |",
            "|---|---|---|---|",
        ]
        for key, sp in spreads.items():
            v = sp["variants"]
            lines.append(
                f"| {key.split('|', 1)[1].strip()} | {sp['pipeline']:.2f} | {min(v):.2f} - "
                f"{max(v):.2f} ({float(np.median(v)):.2f}) | {sp['mean_field']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--pairs", nargs="*", default=None)
    ap.add_argument("--recipes", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--checkpoints", type=int, nargs="*", default=[10, 25, 50, 100])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/dev/real_recipes/results.json"))
    ap.add_argument(
        "--spread",
        action="store_true",
        help="measure the unchanged network's TRE over the pair's 8 orientations (to --out)",
    )
    ap.add_argument(
        "--write",
        type=Path,
        nargs="*",
        default=None,
        help="write the 'real-pair-recipes' section of docs/benchmarks.md from these result "
        "files (no run), and their union to docs/real_pair_recipes.json (--write "
        "docs/real_pair_recipes.json redraws the table from it)",
    )
    args = ap.parse_args(argv)
    if args.write is not None:
        results: dict = {}
        for path in args.write:
            results.update(json.loads(path.read_text()))
        merged = DOCS / "real_pair_recipes.json"  # what the table shows, in one file
        if [p.resolve() for p in args.write] != [merged.resolve()]:
            merged.write_text(json.dumps(results, indent=1))
        update_section(DOCS / "benchmarks.md", "real-pair-recipes", markdown(results))
        return 0
    if args.spread:
        torch.set_num_threads(args.threads)
        specs = [s for s in PAIRS if s.real and (args.pairs is None or s.name in args.pairs)]
        base = nd.load_model("default", device="cpu")
        out = {
            f"spread | {p.name}": spread(p, base)
            for p in load_pairs(default_data_dir(), 448, specs)
        }
        print(json.dumps(out, indent=1))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        return 0
    if args.list:
        for k, v in RECIPES.items():
            print(f"{k}: {v}")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    specs = [s for s in PAIRS if s.real and (args.pairs is None or s.name in args.pairs)]
    pairs = load_pairs(default_data_dir(), 448, specs)
    base = nd.load_model("default", device="cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    for name in args.recipes or list(RECIPES):
        for pair in pairs:
            out = run(pair, base, name, RECIPES[name], args.steps, args.checkpoints, args.seed, log)
            results[f"{pair.name} | {name}"] = {"recipe": RECIPES[name], **out}
            args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
