"""Speed: register (warm, with and without refinement) vs elastix vs SimpleITK on the
same pairs, plus adaptation time and a profile of one adaptation iteration.

    python benchmarks/speed.py [--pairs 10] [--adapt-steps N] [--sizes 192 256]

Writes the "speed" section of docs/benchmarks.md and the "speed" entry of
docs/benchmarks.json. Pairs are T1 fixed vs T2-like moving from the held-out test slices,
rendered at each size. Times are wall-clock seconds per pair on this machine (CPU
threads as torch reports; CUDA when available, recorded).
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

import napari_discreg as nd
from napari_discreg.core import data, peers
from napari_discreg.core.benchmark import update_section
from napari_discreg.core.config import AdaptConfig, DataConfig, RefineConfig
from napari_discreg.core.metrics import end_point_error

DOCS = Path(__file__).resolve().parents[1] / "docs"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_register(model, pairs, device, refine=0) -> tuple[list[float], list[float]]:
    nd.register(pairs[0].fixed, pairs[0].moving, model=model, device=device, refine=refine)
    times, epes = [], []
    for p in pairs:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = nd.register(p.fixed, p.moving, model=model, device=device, refine=refine)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        epes.append(end_point_error(res.displacement, p.displacement, p.mask))
    return times, epes


def time_peer(fn, pairs) -> tuple[list[float], list[float]]:
    times, epes = [], []
    for p in pairs:
        t0 = time.perf_counter()
        disp = fn(p.fixed, p.moving)
        times.append(time.perf_counter() - t0)
        epes.append(end_point_error(disp, p.displacement, p.mask))
    return times, epes


def profile_adaptation(model_path, fixed, moving, device, iterations: int = 3) -> str:
    """torch.profiler table (self CPU time) of ``iterations`` MCD iterations."""
    from torch.profiler import ProfilerActivity, profile

    m = nd.load_model(model_path, device=device)
    cfg = AdaptConfig(select_every=10_000)  # the criterion's own cost is not profiled here
    gen = nd.adapt_steps(m, fixed, moving, steps=iterations + 1, config=cfg, device=device)
    next(gen), next(gen)  # initial record and one warm-up iteration
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in gen:
            pass
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[192, 256])
    ap.add_argument("--adapt-steps", type=int, default=AdaptConfig.steps)
    ap.add_argument(
        "--fast-refine-steps",
        type=int,
        default=20,
        help="steps of the second, faster refinement variant (default 20)",
    )
    ap.add_argument("--model", default=None, help="checkpoint to time (default: shipped model)")
    ap.add_argument("--out-dir", type=Path, default=DOCS)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = nd.load_model(args.model, device=device)
    rows = []
    for size in args.sizes:
        cfg = DataConfig(size=size, max_displacement=6.0 * size / 128)
        template = data.load_template(size)
        pairs = data.fixed_test_pairs(
            template, cfg, n=args.pairs, fixed_contrast="t1", moving_contrast="t2", seed=123
        )
        ident = float(
            np.mean(
                [
                    end_point_error(np.zeros_like(p.displacement), p.displacement, p.mask)
                    for p in pairs
                ]
            )
        )
        entry = {"size": size, "identity_epe": ident}
        fast = RefineConfig(steps=args.fast_refine_steps)
        for name, (times, epes) in {
            "register": time_register(model, pairs, device),
            "register_refine": time_register(model, pairs, device, refine=RefineConfig()),
            "register_refine_fast": time_register(model, pairs, device, refine=fast),
            "elastix": time_peer(peers.elastix_register, pairs),
            "simpleitk": time_peer(peers.simpleitk_register, pairs),
        }.items():
            entry[name] = {"seconds": float(np.median(times)), "epe": float(np.mean(epes))}
        rows.append(entry)
        print(entry)

    # adaptation: args.adapt_steps MCD iterations with the default settings at 192 px targets
    adapt = {}
    if args.adapt_steps > 0:
        size = 192
        cfg = DataConfig(size=size)
        template = data.load_template(size)
        tp = data.fixed_test_pairs(
            template, cfg, n=8, fixed_contrast="t1", moving_contrast="t2", seed=5
        )
        fixed, moving = np.stack([p.fixed for p in tp]), np.stack([p.moving for p in tp])
        m = nd.load_model(args.model, device=device)
        t0 = time.perf_counter()
        nd.adapt(
            m,
            fixed,
            moving,
            discrepancy="pemd",
            steps=args.adapt_steps,
            config=AdaptConfig(),
            device=device,
        )
        adapt = {
            "steps": args.adapt_steps,
            "target_size": size,
            "seconds": time.perf_counter() - t0,
        }
        adapt["profile"] = profile_adaptation(args.model, fixed, moving, device)
        print(adapt)

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {device}"
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(0)})"
    lines = [
        "## Speed: register vs elastix vs SimpleITK",
        "",
        f"Written by `python benchmarks/speed.py --pairs {args.pairs}`; {machine}. Median wall-clock "
        "seconds per pair (model loaded once, one warm-up call; inputs T1 fixed vs T2-like moving from "
        "held-out slices; fields scaled with the image size), mean EPE over the brain beside it. "
        f"`register` here is {'the shipped source model without adaptation' if args.model is None else args.model}; "
        f'"+ refine": `register(refine=...)` with the default `RefineConfig` ({RefineConfig().steps} '
        f"steps per level) or {args.fast_refine_steps} steps per level. Ratio: elastix time / "
        "variant time.",
        "",
        "| size | variant | seconds / pair | EPE (px) | elastix time / this |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "register": "register (network only)",
        "register_refine": f"register + refine ({RefineConfig().steps} steps x {RefineConfig().levels} levels)",
        "register_refine_fast": f"register + refine ({args.fast_refine_steps} steps x {RefineConfig().levels} levels)",
        "elastix": "elastix (MI, B-spline, 3 levels)",
        "simpleitk": "SimpleITK (MI, B-spline)",
    }
    for r in rows:
        lines.append(
            f"| {r['size']}² | identity (no registration) | 0 | {r['identity_epe']:.2f} | |"
        )
        for key, label in labels.items():
            ratio = r["elastix"]["seconds"] / r[key]["seconds"]
            lines.append(
                f"| {r['size']}² | {label} | {r[key]['seconds']:.3f} | {r[key]['epe']:.2f} | "
                f"{ratio:.1f}x |"
            )
    if adapt:
        per = adapt["seconds"] / adapt["steps"]
        lines += [
            "",
            f"Adaptation: {adapt['steps']} MCD iterations (pEMD, default settings: batch "
            f"{AdaptConfig().batch_size}, {AdaptConfig().generator_updates} generator updates, 8 "
            f"target pairs of {adapt['target_size']}²) took {adapt['seconds']:.1f} s, "
            f"{per:.2f} s per iteration (so 100 iterations take about {100 * per:.0f} s here).",
            "",
            "Where an adaptation iteration spends its time (torch.profiler, 3 iterations, self "
            "CPU time):",
            "",
            "```",
            adapt["profile"].rstrip(),
            "```",
        ]
    lines += ["", f"Peak resident memory of the whole run: {peak_rss_mb():.0f} MB."]
    update_section(args.out_dir / "benchmarks.md", "speed", "\n".join(lines))
    json_path = args.out_dir / "benchmarks.json"
    blob = json.loads(json_path.read_text()) if json_path.exists() else {}
    blob["speed"] = {
        "machine": machine,
        "rows": rows,
        "adaptation": adapt,
        "peak_rss_mb": peak_rss_mb(),
    }
    json_path.write_text(json.dumps(blob, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
