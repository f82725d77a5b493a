"""``napari-discreg register``: one pair in, warped image, field and summary out."""

from __future__ import annotations

import time

import numpy as np

from .. import register
from ..core import io
from ..core.config import RefineConfig
from ..core.metrics import normalised_mutual_information
from ..core.model import resolve_device
from ..core.register import DEFAULT_METHOD, METHODS, method_summary
from ..runs.base import load_base_model
from ._common import (
    SHIPPED_NAMES,
    Outputs,
    _device_arg,
    _foreground,
    _non_negative_int,
    _say,
    _write_json,
    add_memory_option,
    refuse_overwriting_inputs,
)


def _add_register(sub) -> None:

    p = sub.add_parser(
        "register",
        help="register a moving image onto a fixed image",
        description=(
            "Register MOVING onto FIXED (2D images of one shape; a 3D file gives one "
            "slice, see --axis/--index). Writes OUTDIR/warped.tif (moving warped onto "
            "fixed), displacement.npy ((2, H, W) float32 pixels, row/col, "
            "warped(r, c) = moving(r + u[0], c + u[1])), discrepancy.tif (per control "
            "point, how much the two heads disagree) and summary.json."
        ),
    )
    p.add_argument("fixed", help="fixed image (.png .jpg .tif .nii .nii.gz .npy)")
    p.add_argument("moving", help="moving image, same shape as FIXED")
    p.add_argument("-o", "--outdir", required=True, help="output folder (created if needed)")
    p.add_argument(
        "--model",
        help="checkpoint (.safetensors), or a shipped model by name ("
        + SHIPPED_NAMES
        + "); default: default",
    )
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--axis", type=int, help="slice axis for 3D files (default 0; 2 for NIfTI)")
    p.add_argument("--index", type=int, help="slice index for 3D files (default: middle)")
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help=f"how the field is made (default {DEFAULT_METHOD}: "
        + "; ".join(f"{k}: {v}" for k, v in METHODS.items())
        + ")",
    )
    p.add_argument(
        "--refine",
        type=_non_negative_int,
        nargs="?",
        const=RefineConfig.steps,
        default=None,
        metavar="STEPS",
        help="Adam steps of --method network+adam (default "
        f"{RefineConfig.steps}); without --method, --refine STEPS selects network+adam and "
        "--refine 0 the network alone, as in earlier releases",
    )
    add_memory_option(p)
    p.set_defaults(func=_run_register)


def _run_register(args) -> int:

    outputs = Outputs(args.outdir)
    names = {
        "warped": "warped.tif",
        "displacement": "displacement.npy",
        "discrepancy": "discrepancy.tif",
        "summary": "summary.json",
    }
    refuse_overwriting_inputs(
        [("the output", outputs.final(n)) for n in names.values()],
        {"FIXED": args.fixed, "MOVING": args.moving, "--model": args.model},
    )
    fixed = io.read_image(args.fixed, axis=args.axis, index=args.index)
    moving = io.read_image(args.moving, axis=args.axis, index=args.index)
    if fixed.shape != moving.shape:
        raise ValueError(
            f"fixed {args.fixed} is {fixed.shape[0]} x {fixed.shape[1]} but moving {args.moving} "
            f"is {moving.shape[0]} x {moving.shape[1]}; resample or crop one onto the other's grid"
        )
    device = resolve_device(args.device)
    model, model_desc = load_base_model(args.model, device)

    if args.refine is not None and args.method in ("bspline", "network+bspline", "network"):
        raise ValueError(f"--refine STEPS applies to --method network+adam, not {args.method}")
    start = time.perf_counter()
    result = register(
        fixed, moving, model=model, device=device, method=args.method, refine=args.refine
    )
    runtime = time.perf_counter() - start
    start = time.perf_counter()
    discrepancy = result.discrepancy  # the network's view; computed here for "bspline"
    histograms_s = time.perf_counter() - start

    magnitude = np.sqrt((result.displacement.astype(np.float64) ** 2).sum(0))
    mask = _foreground(fixed)
    nmi_before = normalised_mutual_information(fixed, moving, mask=mask)
    nmi_after = normalised_mutual_information(fixed, result.warped, mask=mask)
    summary = {
        "fixed": str(args.fixed),
        "moving": str(args.moving),
        "shape": list(fixed.shape),
        "model": model_desc,
        "device": str(device),
        "method": result.method,
        "runtime_s": runtime,
        "histograms_s": histograms_s,
        "refine_steps": result.refine_steps,
        "identity_fallback": result.identity_fallback,
        "displacement_px": {"mean_abs": float(magnitude.mean()), "max_abs": float(magnitude.max())},
        "nmi": {
            "before": nmi_before,
            "after": nmi_after,
            "region": "fixed foreground" if mask is not None else "whole image",
        },
        "discrepancy": {
            "mean": float(discrepancy.mean()),
            "max": float(discrepancy.max()),
            "control_grid": list(discrepancy.shape),
            "stride_px": result.stride,
        },
        "num_labels": int(result.offsets.shape[0]),
        "capture_range_px": float(result.offsets.max()),
        "outputs": {k: str(outputs.final(v)) for k, v in names.items()},
        "command": args.command_line,
    }
    with outputs:
        io.write_image(outputs.path(names["warped"]), result.warped)
        io.write_field(outputs.path(names["displacement"]), result.displacement)
        io.write_image(outputs.path(names["discrepancy"]), discrepancy)
        _write_json(outputs.path(names["summary"]), summary)

    h, w = fixed.shape
    _say(
        f"registered {args.moving} onto {args.fixed} ({h} x {w}) in {runtime:.2f} s on {device}"
        f" with {method_summary(result)}"
    )
    if result.identity_fallback:
        _say("  the field matched the pair worse than no motion, so the zero field was kept")
    _say(f"  |u| mean {magnitude.mean():.2f} px, max {magnitude.max():.2f} px")
    _say(
        f"  NMI {nmi_before:.4f} -> {nmi_after:.4f}; mean head discrepancy {discrepancy.mean():.3f}"
    )
    _say(f"  wrote {', '.join(names.values())} in {outputs.folder}")
    return 0
