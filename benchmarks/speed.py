"""Speed and accuracy: register()'s default pipeline beside elastix and SimpleITK, same pairs,
same run; plus adaptation time and torch.profiler tables.

    python benchmarks/speed.py [--pairs 10] [--sizes 128 192 256] [--contrasts t2 pd]
                               [--sitk-pairs 4] [--adapt-steps N] [--quick]

Writes the "speed" section of docs/benchmarks.md and the "speed" entry of
docs/benchmarks.json. Pairs: T1 fixed vs T2-like / PD-like moving from the held-out test
slices, rendered at each size (deformations scale with the size). Every pair is run by
every variant in turn (so load on a shared machine hits them alike); the table gives the
median wall-clock seconds per pair, the mean EPE over the brain, the share of folded pixels
(Jacobian determinant <= 0) and elastix's time divided by the variant's.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from _protocol import update_section

import napari_discreg as nd
from napari_discreg.core import peers
from napari_discreg.core.config import AdaptConfig, BSplineConfig, DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.registration.metrics import end_point_error
from napari_discreg.core.registration.warp import jacobian_determinant

DOCS = Path(__file__).resolve().parents[1] / "docs"

VARIANTS = {
    "default": '**`method="bspline"`** (B-spline Gauss-Newton, MIND-SSC; no pre-alignment)',
    "default_hist": '`method="bspline"` + the network\'s histograms (the widget with it)',
    "network": '`method="network"` (the network alone; no pre-alignment)',
    "elastix": "elastix (MI, B-spline, 3 levels)",
    "simpleitk": "SimpleITK (MI, B-spline)",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def variant_functions(model, device, with_peers: bool = True):
    """name -> fn(fixed, moving) -> (2, H, W) field, for the variants of :data:`VARIANTS`."""

    # these pairs share one grid: the deformable methods alone, without pre-alignment (the
    # default pipeline on real pairs is measured by benchmarks/landmarks.py)
    kw = {"model": model, "device": device, "prealign": "none"}

    def default(f, m):
        return nd.register(f, m, method="bspline", **kw).displacement

    def default_hist(f, m):
        res = nd.register(f, m, method="bspline", **kw)
        res.network_outputs()
        return res.displacement

    def network(f, m):
        return nd.register(f, m, method="network", **kw).displacement

    fns = {"default": default, "default_hist": default_hist, "network": network}
    if with_peers:
        fns["elastix"] = peers.elastix_register
        fns["simpleitk"] = peers.simpleitk_register
    return fns


def measure(fns: dict, pairs, device, sitk_pairs: int) -> dict:
    """Run every variant on every pair, rotating the order; medians and means per variant."""
    for name, fn in fns.items():  # warm-up (model load, caches, first-call costs)
        if name != "simpleitk":
            fn(pairs[0].fixed, pairs[0].moving)
    times: dict[str, list[float]] = {k: [] for k in fns}
    epes: dict[str, list[float]] = {k: [] for k in fns}
    folds: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i, p in enumerate(pairs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if name == "simpleitk" and i >= sitk_pairs:
                continue
            _sync(device)
            t0 = time.perf_counter()
            disp = fns[name](p.fixed, p.moving)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            epes[name].append(end_point_error(disp, p.displacement, p.mask))
            folds[name].append(float((jacobian_determinant(disp)[p.mask > 0] <= 0).mean()))
    return {
        k: {
            "seconds": float(np.median(times[k])),
            "epe": float(np.mean(epes[k])),
            "folding": float(np.mean(folds[k])),
            "pairs": len(times[k]),
        }
        for k in fns
        if times[k]
    }


def profile_default(model, pair, device) -> str:
    """torch.profiler table (self CPU time) of 5 default registrations of one pair."""
    from torch.profiler import ProfilerActivity, profile

    kw = {"model": model, "device": device, "method": "bspline", "prealign": "none"}
    nd.register(pair.fixed, pair.moving, **kw)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            nd.register(pair.fixed, pair.moving, **kw)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def profile_adaptation(model_path, fixed, moving, device, iterations: int = 3) -> str:
    """torch.profiler table (self CPU time) of ``iterations`` MCD iterations."""
    from torch.profiler import ProfilerActivity, profile

    m = nd.load_model(model_path, device=device)
    cfg = AdaptConfig.mcd(select_every=10_000)  # the criterion's own cost is not profiled here
    gen = nd.adapt_steps(m, fixed, moving, steps=iterations + 1, config=cfg, device=device)
    next(gen), next(gen)  # initial record and one warm-up iteration
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in gen:
            pass
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def test_pairs(size: int, contrast: str, n: int):
    cfg = DataConfig(size=size, max_displacement=6.0 * size / 128)
    return data.fixed_test_pairs(
        data.load_template(size), cfg, n=n, fixed_contrast="t1", moving_contrast=contrast, seed=123
    )


def markdown(rows: list[dict], args, machine: str, adapt: dict, profile: str) -> str:
    b = BSplineConfig()
    lines = [
        "## Speed: register() vs elastix vs SimpleITK",
        "",
        f"Written by `python benchmarks/speed.py --pairs {args.pairs}`; {machine}. "
        "T1 fixed vs T2-like or PD-like moving from held-out test slices (deformations "
        "scaled with the size). Every pair is run by every variant in turn, in the same run; "
        "median wall-clock seconds per pair (after a warm-up call), mean EPE over the brain, "
        "folded share of the brain (Jacobian determinant <= 0). Ratio: elastix's time / the "
        f"variant's. SimpleITK on the first {args.sitk_pairs} pairs only (it takes seconds "
        f"per pair). The B-spline method (the default until the real-pairs pipeline): "
        f'`register(fixed, moving, method="bspline", prealign="none")` = `BSplineConfig()` (spacing '
        f"{b.spacing:g} px, {b.levels} levels, {'/'.join(map(str, b.iterations))} Gauss-Newton "
        f"steps, smoothness {b.smoothness:g}, MIND-SSC dilations {b.dilations}), the same "
        "pipeline as `napari-discreg register --method bspline --prealign none`. The widget "
        "also computes the network's histograms for the inspector (second row).",
        "",
        "| size | moving | variant | seconds / pair | EPE (px) | folding | elastix time / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}² | {r['contrast'].upper()} | identity (no registration) | 0 | "
            f"{r['identity_epe']:.2f} | | |"
        )
        for key, label in VARIANTS.items():
            if key not in r["variants"]:
                continue
            v = r["variants"][key]
            ratio = (
                r["variants"]["elastix"]["seconds"] / v["seconds"]
                if "elastix" in r["variants"]
                else float("nan")
            )
            lines.append(
                f"| {r['size']}² | {r['contrast'].upper()} | {label} | {v['seconds']:.3f} | "
                f"{v['epe']:.3f} | {v['folding']:.2%} | {ratio:.1f}x |"
            )
    if "elastix" in rows[0]["variants"]:
        lines += ["", "Summary of the default against elastix (EPE ratio < 1: more accurate):", ""]
        lines += [
            "| size | moving | EPE default / elastix | elastix time / default |",
            "|---|---|---|---|",
        ]
        for r in rows:
            d, e = r["variants"]["default"], r["variants"]["elastix"]
            lines.append(
                f"| {r['size']}² | {r['contrast'].upper()} | {d['epe'] / e['epe']:.2f} | "
                f"{e['seconds'] / d['seconds']:.1f}x |"
            )
    lines += [
        "",
        "A learned peer: none qualifies. VoxelMorph 0.3.4 (PyPI) ships no weights (15 files, "
        "no checkpoint; pretrained models are downloaded separately), and no other 2D "
        "multimodal registration package on PyPI that we know of bundles its weights.",
        "",
        "Where the default spends its time (torch.profiler, 5 registrations of one 192² T2 "
        "pair, self CPU time; the banded solve runs in SciPy, outside these rows):",
        "",
        "```",
        profile.rstrip(),
        "```",
    ]
    if adapt:
        per = adapt["seconds"] / adapt["steps"]
        lines += [
            "",
            f"Adaptation: {adapt['steps']} MCD iterations (pEMD, default settings: batch "
            f"{AdaptConfig.mcd().batch_size}, {AdaptConfig.mcd().generator_updates} generator "
            "updates, 8 "
            f"target pairs of {adapt['target_size']}²) took {adapt['seconds']:.1f} s, "
            f"{per:.2f} s per iteration.",
            "",
            "Where an adaptation iteration spends its time (torch.profiler, 3 iterations, self "
            "CPU time):",
            "",
            "```",
            adapt["profile"].rstrip(),
            "```",
        ]
    lines += ["", f"Peak resident memory of the whole run: {peak_rss_mb():.0f} MB."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--sitk-pairs", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256])
    ap.add_argument("--contrasts", nargs="+", default=["t2", "pd"])
    ap.add_argument("--adapt-steps", type=int, default=AdaptConfig.mcd().steps)
    ap.add_argument("--model", default=None, help="checkpoint to time (default: shipped model)")
    ap.add_argument("--no-peers", action="store_true", help="skip elastix and SimpleITK")
    ap.add_argument("--out-dir", type=Path, default=DOCS)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = nd.load_model(args.model, device=device)
    fns = variant_functions(model, device, with_peers=not args.no_peers)
    rows = []
    for size in args.sizes:
        for contrast in args.contrasts:
            pairs = test_pairs(size, contrast, args.pairs)
            ident = float(
                np.mean(
                    [
                        end_point_error(np.zeros_like(p.displacement), p.displacement, p.mask)
                        for p in pairs
                    ]
                )
            )
            entry = {
                "size": size,
                "contrast": contrast,
                "identity_epe": ident,
                "variants": measure(fns, pairs, device, args.sitk_pairs),
            }
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    profile = profile_default(model, test_pairs(192, "t2", 1)[0], device)

    adapt = {}
    if args.adapt_steps > 0:
        size = 192
        tp = test_pairs(size, "t2", 8)
        fixed, moving = np.stack([p.fixed for p in tp]), np.stack([p.moving for p in tp])
        m = nd.load_model(args.model, device=device)
        t0 = time.perf_counter()
        nd.adapt(
            m,
            fixed,
            moving,
            discrepancy="pemd",
            steps=args.adapt_steps,
            config=AdaptConfig.mcd(),
            device=device,
        )
        adapt = {
            "steps": args.adapt_steps,
            "target_size": size,
            "seconds": time.perf_counter() - t0,
        }
        adapt["profile"] = profile_adaptation(args.model, fixed, moving, device)

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {device}"
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(0)})"
    text = markdown(rows, args, machine, adapt, profile)
    update_section(args.out_dir / "benchmarks.md", "speed", text)
    json_path = args.out_dir / "benchmarks.json"
    blob = json.loads(json_path.read_text()) if json_path.exists() else {}
    blob["speed"] = {
        "machine": machine,
        "rows": rows,
        "adaptation": adapt,
        "peak_rss_mb": peak_rss_mb(),
    }
    json_path.write_text(json.dumps(blob, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
