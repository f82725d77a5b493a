"""``napari-discreg demo``: the headless main job, a registered sample pair and a report."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .. import __version__
from ..core.config import DataConfig
from ..core.data.template import TISSUES, load_template, make_pair
from ..core.files.transaction import OutputSet, write_text
from ..core.learning.evaluate import control_point_accuracy
from ..core.learning.model import resolve_device
from ..core.registration.geometry import fixed_to_moving
from ..core.registration.methods import DEFAULT_METHOD, METHODS, resolve_method
from ..core.registration.metrics import (
    dice,
    end_point_error,
    folding_fraction,
    normalised_mutual_information,
)
from ..core.registration.register import method_summary
from ..core.registration.review import review_images
from ..core.registration.warp import warp_numpy
from ..runs.base import load_base_model
from ..runs.registration import RegistrationSpec, register_pair
from ._common import (
    SHIPPED_NAMES,
    _device_arg,
    _non_negative_int,
    _positive_int,
    _say,
    _write_json,
    add_memory_option,
    check_refine_flag,
)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="register a built-in T1 vs T2-like pair and write a report",
        description=(
            "Make a sample multimodal pair (T1 fixed, T2-like moving, known random "
            "deformation) from the MNI template, register it (the default method, and the "
            "network alone for comparison) and write "
            "OUTDIR/report.png, report.json and report.md with the end-point error, "
            "NMI, Dice of CSF/GM/WM, folding and runtime."
        ),
    )

    p.add_argument("-o", "--outdir", required=True, help="output folder (created if needed)")
    p.add_argument("--size", type=_positive_int, default=192, help="image size in px (default 192)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the deformation and noise (default 0)"
    )
    p.add_argument(
        "--slice",
        type=int,
        dest="slice_index",
        help="axial template slice (default: middle test slice)",
    )
    p.add_argument(
        "--model",
        help="checkpoint, or a shipped model by name (" + SHIPPED_NAMES + "); default: default",
    )
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu or cuda")
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help=f"registration method (default {DEFAULT_METHOD}); see 'register --help'",
    )
    p.add_argument(
        "--refine",
        type=_non_negative_int,
        default=None,
        metavar="STEPS",
        help="Adam steps of --method network+adam; without --method, 0 is the network alone",
    )
    p.add_argument(
        "--no-real-pair",
        dest="real_pair",
        action="store_false",
        help="skip the shipped histology pair (registered from the raw RGB images by default)",
    )
    add_memory_option(p)
    p.set_defaults(func=_run_demo)


def _label_accuracy(result, truth: np.ndarray, mask: np.ndarray) -> float:
    """Share of foreground control points whose argmax label is the true quantised one."""

    k, q = result.offsets.shape[0], float(result.offsets.max())
    return control_point_accuracy(result.labels, truth, mask, result.stride, k, q)


def demo_metrics(pair, result, runtime: float) -> dict[str, Any]:
    """The numbers of the demo report for a :class:`~napari_discreg.core.data.template.Pair`."""

    mask = pair.mask > 0
    zero = np.zeros_like(pair.displacement)
    warped_labels = warp_numpy(pair.moving_labels, result.displacement, order=0)
    return {
        "epe_px": {
            "identity": end_point_error(zero, pair.displacement, mask),
            "registered": end_point_error(result.displacement, pair.displacement, mask),
        },
        "nmi": {
            "before": normalised_mutual_information(pair.fixed, pair.moving, mask=mask),
            "after": normalised_mutual_information(pair.fixed, result.warped, mask=mask),
        },
        "dice": {
            name: {
                "before": dice(pair.moving_labels, pair.fixed_labels, label),
                "after": dice(warped_labels, pair.fixed_labels, label),
            }
            for label, name in enumerate(TISSUES, start=1)
        },
        "label_accuracy": _label_accuracy(result, pair.displacement, mask),
        "folding_fraction": folding_fraction(result.displacement, mask),
        "mean_discrepancy": float(result.discrepancy.mean()),
        "true_max_displacement_px": float(np.sqrt((pair.displacement**2).sum(0)).max()),
        "runtime_s": runtime,
    }


def demo_figure(pair, result, metrics: dict[str, Any]):
    """The report figure (a :class:`matplotlib.figure.Figure`, Agg canvas, no pyplot)."""

    fig = Figure(figsize=(17, 8.6), layout="constrained")
    axes = fig.subplots(2, 4)
    gray = {"cmap": "gray", "interpolation": "nearest"}
    epe, nmi = metrics["epe_px"], metrics["nmi"]

    def show(ax, image, title, **kw):
        im = ax.imshow(image, **{**gray, **kw})
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
        return im

    show(axes[0, 0], pair.fixed, f"fixed ({pair.fixed_contrast.upper()})")
    show(axes[0, 1], pair.moving, f"moving ({pair.moving_contrast.upper()}-like)")
    show(axes[0, 2], result.warped, "moving warped onto fixed")
    pred_mag = np.sqrt((result.displacement**2).sum(0))
    true_mag = np.sqrt((pair.displacement**2).sum(0))
    vmax = float(max(pred_mag.max(), true_mag.max(), 1e-6))
    im = show(
        axes[0, 3],
        pred_mag,
        "|u| predicted (px); arrows x3:\nwhite predicted, red true",
        cmap="viridis",
        vmin=0,
        vmax=vmax,
    )
    fig.colorbar(im, ax=axes[0, 3], shrink=0.8)
    h, w = pred_mag.shape
    step = max(1, min(h, w) // 16)
    rr, cc = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    for field, colour in ((pair.displacement, "red"), (result.displacement, "white")):
        axes[0, 3].quiver(
            cc,
            rr,
            field[1, rr, cc],
            field[0, rr, cc],
            color=colour,
            angles="xy",
            scale_units="xy",
            scale=1 / 3,
            width=0.004,
        )
    show(
        axes[1, 0],
        review_images(pair.fixed, pair.moving)["checkerboard"],
        f"checkerboard before (NMI {nmi['before']:.3f})",
    )
    show(
        axes[1, 1],
        review_images(pair.fixed, result.warped)["checkerboard"],
        f"checkerboard after (NMI {nmi['after']:.3f})",
    )
    err = np.sqrt(((result.displacement - pair.displacement) ** 2).sum(0)) * (pair.mask > 0)
    im = show(
        axes[1, 2],
        err,
        f"|u predicted - u true| in brain (px)\nEPE {epe['identity']:.2f} -> "
        f"{epe['registered']:.2f} px",
        cmap="magma",
        vmin=0,
        vmax=vmax,
    )
    fig.colorbar(im, ax=axes[1, 2], shrink=0.8)
    s = result.stride
    gh, gw = result.discrepancy.shape
    im = show(
        axes[1, 3],
        result.discrepancy,
        "head discrepancy (pEMD, bins)",
        cmap="inferno",
        extent=(-0.5, gw * s - 0.5, gh * s - 0.5, -0.5),
    )
    axes[1, 3].set_xlim(-0.5, w - 0.5)
    axes[1, 3].set_ylim(h - 0.5, -0.5)
    fig.colorbar(im, ax=axes[1, 3], shrink=0.8)
    d = metrics["dice"]
    fig.suptitle(
        f"napari-discreg demo: slice {pair.index}, {h} x {w} px; Dice GM {d['gm']['before']:.2f} -> "
        f"{d['gm']['after']:.2f}, WM {d['wm']['before']:.2f} -> {d['wm']['after']:.2f}, CSF "
        f"{d['csf']['before']:.2f} -> {d['csf']['after']:.2f}; folding "
        f"{metrics['folding_fraction']:.2%}; {metrics['runtime_s']:.2f} s",
        fontsize=11,
    )
    return fig


def demo_markdown(report: dict[str, Any]) -> str:
    m, p = report["metrics"], report["pair"]
    rows = [
        (
            "end-point error over the brain (px)",
            m["epe_px"]["identity"],
            m["epe_px"]["registered"],
            ".3f",
        ),
        ("normalised mutual information", m["nmi"]["before"], m["nmi"]["after"], ".4f"),
        *(
            (f"Dice {t.upper()}", m["dice"][t]["before"], m["dice"][t]["after"], ".3f")
            for t in ("gm", "wm", "csf")
        ),
    ]
    lines = [
        "# napari-discreg demo",
        "",
        f"Fixed {p['fixed_contrast'].upper()}, moving {p['moving_contrast'].upper()}-like, axial "
        f"template slice {p['slice']}, {p['size']} x {p['size']} px, seed {p['seed']}; known random "
        f"deformation of at most {m['true_max_displacement_px']:.2f} px.",
        f"Model: {report['model']}; device {report['device']}.",
        "",
        "| measure | before (identity) | after registration |",
        "|---|---|---|",
        *(f"| {name} | {a:{fmt}} | {b:{fmt}} |" for name, a, b, fmt in rows),
        "",
        *(
            [
                f"- registration: {m['method_summary']} (`register(method="
                f"{m['method']!r})`); the network "
                f"alone: EPE {m['network_only']['epe_px']:.3f} px, NMI "
                f"{m['network_only']['nmi_after']:.4f}, label accuracy "
                f"{m['network_only']['label_accuracy']:.1%}, "
                f"{m['network_only']['runtime_s']:.3f} s",
            ]
            if m.get("network_only")
            else [f"- registration: {m['method_summary']} (`register(method={m['method']!r})`)"]
        ),
        f"- label accuracy of the network's histograms (foreground control points; the "
        f"same whatever the method): {m['label_accuracy']:.1%}",
        f"- folding (Jacobian determinant <= 0, brain): {m['folding_fraction']:.3%}",
        f"- mean head discrepancy (pEMD, bins): {m['mean_discrepancy']:.4f}",
        f"- runtime of one registration (after a warm-up call): {m['runtime_s']:.3f} s",
        "",
        "![report](report.png)",
        "",
    ]
    real = report.get("real_pair")
    if real:
        t = real["median_tre_px"]
        lines += [
            "## A real stain pair",
            "",
            f"The shipped histology sample ({real['pair']}; fixed {real['fixed_shape']}, moving "
            f"{real['moving_shape']}, RGB), registered from the raw images by "
            f"{real['method_summary']}: median landmark error over {real['landmarks']} "
            f"landmarks placed by people {t['before']:.2f} -> {t['after']:.2f} px, "
            f"{real['robustness']:.0%} of the landmarks closer than before, "
            f"{real['runtime_s']:.2f} s."
            + (f" Warnings: {'; '.join(real['warnings'])}" if real["warnings"] else ""),
            "",
        ]
    return "\n".join(lines)


def real_pair_metrics(model, device, max_memory_gb: float | None = None) -> dict[str, Any]:
    """The shipped histology sample (HE fixed, proSPC moving, RGB of different sizes, 78
    landmarks placed by people) registered by the default pipeline: the median landmark
    error before and after, in moving pixels."""
    from skimage.io import imread

    from .._sample_data import HISTOLOGY_FIXED, HISTOLOGY_MOVING, SAMPLES, read_landmarks

    fixed = imread(SAMPLES / f"{HISTOLOGY_FIXED}.jpg")
    moving = imread(SAMPLES / f"{HISTOLOGY_MOVING}.jpg")
    _, pf = read_landmarks(SAMPLES / f"{HISTOLOGY_FIXED}.csv")
    _, pm = read_landmarks(SAMPLES / f"{HISTOLOGY_MOVING}.csv")
    start = time.perf_counter()
    res = register_pair(
        RegistrationSpec(fixed, moving, model=model, device=device, max_memory_gb=max_memory_gb)
    )
    seconds = time.perf_counter() - start
    before = np.linalg.norm(pf - pm, axis=1)
    after = np.linalg.norm(fixed_to_moving(pf, res.displacement) - pm, axis=1)
    return {
        "pair": "lung lesion, HE (fixed) vs proSPC (moving), CIMA/ANHIR via BIRL",
        "fixed_shape": list(fixed.shape),
        "moving_shape": list(moving.shape),
        "landmarks": int(len(pf)),
        "median_tre_px": {"before": float(np.median(before)), "after": float(np.median(after))},
        "robustness": float(np.mean(after < before)),
        "method_summary": method_summary(res),
        "runtime_s": seconds,
        "warnings": list(res.warnings),
    }


def _run_demo(args) -> int:

    outputs = OutputSet(args.outdir, ("report.png", "report.json", "report.md"))
    dcfg = DataConfig(size=args.size)
    index = args.slice_index if args.slice_index is not None else sum(dcfg.test_slices) // 2
    device = resolve_device(args.device)
    model, model_desc = load_base_model(args.model, device)
    template = load_template(args.size, max_memory_gb=args.max_memory_gb)
    pair = make_pair(template, index, "t1", "t2", np.random.default_rng(args.seed), dcfg)

    check_refine_flag(args.method, args.refine)
    chosen, settings = resolve_method(args.method, args.refine)
    method = chosen.name
    runs = {}
    for name in dict.fromkeys([method, "network"]):
        how = settings if name == method else None
        spec = RegistrationSpec(
            pair.fixed,
            pair.moving,
            model=model,
            device=device,
            method=name,
            refine=how,
            max_memory_gb=args.max_memory_gb,
        )
        register_pair(spec)
        start = time.perf_counter()  # timed after a warm-up call
        res = register_pair(spec)
        runs[name] = (res, time.perf_counter() - start)
    result, runtime = runs[method]
    metrics = demo_metrics(pair, result, runtime)
    metrics["method"] = method
    metrics["method_summary"] = method_summary(result)
    metrics["refine_steps"] = result.refine_steps
    if method != "network":
        net, net_time = runs["network"]
        net_metrics = demo_metrics(pair, net, net_time)
        metrics["network_only"] = {
            "epe_px": net_metrics["epe_px"]["registered"],
            "nmi_after": net_metrics["nmi"]["after"],
            "label_accuracy": net_metrics["label_accuracy"],
            "runtime_s": net_time,
        }
    real = real_pair_metrics(model, device, args.max_memory_gb) if args.real_pair else None
    report = {
        "real_pair": real,
        "pair": {
            "fixed_contrast": pair.fixed_contrast,
            "moving_contrast": pair.moving_contrast,
            "slice": pair.index,
            "size": args.size,
            "seed": args.seed,
        },
        "model": model_desc,
        "device": str(device),
        "metrics": metrics,
        "command": args.command_line,
        "napari_discreg_version": __version__,
    }
    fig = demo_figure(pair, result, metrics)
    with outputs:
        fig.savefig(outputs.path("report.png"), dpi=100, format="png")
        _write_json(outputs.path("report.json"), report)
        write_text(outputs.path("report.md"), demo_markdown(report))

    epe, d = metrics["epe_px"], metrics["dice"]
    how = method_summary(result)
    _say(
        f"demo: T1 vs T2-like slice {pair.index}, {args.size} px, registered ({how}) in "
        f"{runtime:.2f} s on {device}"
    )
    if method != "network":
        net = metrics["network_only"]
        _say(f"  network alone: EPE {net['epe_px']:.3f} px in {net['runtime_s']:.2f} s")
    _say(
        f"  EPE {epe['identity']:.3f} -> {epe['registered']:.3f} px; NMI {metrics['nmi']['before']:.4f} -> "
        f"{metrics['nmi']['after']:.4f}"
    )
    _say(
        f"  Dice GM {d['gm']['before']:.3f} -> {d['gm']['after']:.3f}, WM {d['wm']['before']:.3f} -> "
        f"{d['wm']['after']:.3f}, CSF {d['csf']['before']:.3f} -> {d['csf']['after']:.3f}; "
        f"folding {metrics['folding_fraction']:.3%}"
    )
    if real is not None:
        t = real["median_tre_px"]
        _say(
            f"  real stain pair (sample data, {real['landmarks']} landmarks): median TRE "
            f"{t['before']:.2f} -> {t['after']:.2f} px in {real['runtime_s']:.2f} s"
        )
    _say(f"report: {outputs.final('report.png')} (also report.json, report.md)")
    return 0
