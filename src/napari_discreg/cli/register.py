"""``napari-discreg register``: one pair in, warped image, field and summary out."""

from __future__ import annotations

import time

import numpy as np

from ..core.config import RefineConfig
from ..core.files import imagefiles
from ..core.files.itk_field import itk_affine_text
from ..core.files.transaction import OutputSet, write_text
from ..core.learning.model import resolve_device
from ..core.registration.methods import DEFAULT_METHOD, METHODS
from ..core.registration.metrics import normalised_mutual_information
from ..core.registration.prealign import (
    DEFAULT_PREALIGN,
    PREALIGN_MODES,
    describe_affine,
    resample,
    unmoved_matrix,
)
from ..core.registration.register import method_summary
from ..core.registration.review import tissue_region
from ..runs.base import load_base_model
from ..runs.registration import RegistrationSpec, register_pair
from ._common import (
    SHIPPED_NAMES,
    _device_arg,
    _non_negative_int,
    _positive_float,
    _say,
    _write_json,
    add_memory_option,
    check_refine_flag,
    refuse_overwriting_inputs,
)


def _add_register(sub) -> None:

    p = sub.add_parser(
        "register",
        help="register a moving image onto a fixed image",
        description=(
            "Register MOVING onto FIXED (2D images of any sizes, grayscale or colour; a 3D "
            "file gives one slice, see --axis/--index): a pre-alignment (--prealign), then "
            "the deformable method. Writes OUTDIR/warped.tif (moving warped onto fixed's "
            "grid), displacement.npy ((2, H, W) float32 pixels on the fixed grid, row/col, "
            "warped(r, c) = moving(r + u[0], c + u[1]) in the moving image's pixels), "
            "affine.tfm (the pre-alignment as an ITK transform), discrepancy.tif (per "
            "control point, how much the two heads disagree) and summary.json."
        ),
    )
    p.add_argument("fixed", help="fixed image (.png .jpg .tif .nii .nii.gz .npy)")
    p.add_argument("moving", help="moving image (any size; its own grid)")
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
        + "; ".join(f"{k}: {m.description}" for k, m in METHODS.items())
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
    p.add_argument(
        "--prealign",
        choices=list(PREALIGN_MODES),
        default=DEFAULT_PREALIGN,
        help=f"the transform found before the deformable method (default {DEFAULT_PREALIGN}: "
        + "; ".join(f"{k}: {v}" for k, v in PREALIGN_MODES.items())
        + ")",
    )
    for which in ("fixed", "moving"):
        p.add_argument(
            f"--{which}-spacing",
            type=_positive_float,
            nargs=2,
            metavar=("ROW", "COL"),
            help=f"physical pixel size of {which.upper()} (default: from a NIfTI header, else 1 1)",
        )
    add_memory_option(p)
    p.set_defaults(func=_run_register)


def _run_register(args) -> int:

    names = {
        "warped": "warped.tif",
        "displacement": "displacement.npy",
        "affine": "affine.tfm",
        "discrepancy": "discrepancy.tif",
        "summary": "summary.json",
    }
    outputs = OutputSet(args.outdir, names.values())
    refuse_overwriting_inputs(
        [("the output", outputs.final(n)) for n in names.values()],
        {"FIXED": args.fixed, "MOVING": args.moving, "--model": args.model},
    )
    fixed = imagefiles.read_image(args.fixed, axis=args.axis, index=args.index)
    moving = imagefiles.read_image(args.moving, axis=args.axis, index=args.index)
    fixed_spacing = args.fixed_spacing or imagefiles.read_spacing(args.fixed, axis=args.axis)
    moving_spacing = args.moving_spacing or imagefiles.read_spacing(args.moving, axis=args.axis)
    device = resolve_device(args.device)
    model, model_desc = load_base_model(args.model, device)

    check_refine_flag(args.method, args.refine)
    start = time.perf_counter()
    result = register_pair(
        RegistrationSpec(
            fixed,
            moving,
            model=model,
            device=device,
            method=args.method,
            refine=args.refine,
            prealign=args.prealign,
            fixed_spacing=fixed_spacing,
            moving_spacing=moving_spacing,
            max_memory_gb=args.max_memory_gb,
        )
    )
    runtime = time.perf_counter() - start
    start = time.perf_counter()
    discrepancy = result.discrepancy  # the network's view; computed here for "bspline"
    histograms_s = time.perf_counter() - start

    magnitude = np.sqrt((result.displacement.astype(np.float64) ** 2).sum(0))
    mask = tissue_region(fixed)
    before = resample(moving, unmoved_matrix(fixed_spacing, moving_spacing), fixed.shape)
    nmi_before = normalised_mutual_information(fixed, before, mask=mask)
    nmi_after = normalised_mutual_information(fixed, result.warped, mask=mask)
    summary = {
        "fixed": str(args.fixed),
        "moving": str(args.moving),
        "shape": list(fixed.shape),
        "moving_shape": list(moving.shape),
        "fixed_spacing": list(fixed_spacing),
        "moving_spacing": list(moving_spacing),
        "prealign": result.prealign,
        "affine_px": result.affine.tolist(),
        "quality": result.quality,
        "warnings": result.warnings,
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
        imagefiles.write_image(outputs.path(names["warped"]), result.warped)
        imagefiles.write_field(outputs.path(names["displacement"]), result.displacement)
        write_text(
            outputs.path(names["affine"]),
            itk_affine_text(
                result.affine, fixed_spacing=fixed_spacing, moving_spacing=moving_spacing
            ),
        )
        imagefiles.write_image(outputs.path(names["discrepancy"]), discrepancy)
        _write_json(outputs.path(names["summary"]), summary)

    h, w = fixed.shape
    _say(
        f"registered {args.moving} onto {args.fixed} ({h} x {w}) in {runtime:.2f} s on {device}"
        f" with {method_summary(result)}"
    )
    if result.prealign != "none":
        _say(f"  pre-alignment ({result.prealign}): {describe_affine(result.affine)}")
    if result.identity_fallback:
        _say("  the deformable field matched worse than the pre-alignment alone, so it was dropped")
    for note in result.warnings:
        _say(f"  warning: {note}")
    _say(f"  |u| mean {magnitude.mean():.2f} px, max {magnitude.max():.2f} px")
    _say(
        f"  NMI {nmi_before:.4f} -> {nmi_after:.4f}; mean head discrepancy {discrepancy.mean():.3f}"
    )
    _say(f"  wrote {', '.join(names.values())} in {outputs.folder}")
    return 0
