"""Real landmarks (ANHIR metrics): register() variants beside elastix, ANTs and SimpleITK.

    python benchmarks/landmarks.py [--size 448] [--threads 1] [--variants NAME ...]
                                   [--extra-variant 'name={"method": "network"}' ...]
                                   [--peers elastix ants simpleitk [simpleitk-bspline]]
                                   [--synthetic-pairs 12] [--data DIR] [--quick] [--no-write]

Writes the "landmarks" section of docs/benchmarks.md and docs/landmarks.json (all raw
numbers); ``--no-write`` prints the section only.

Real pairs (``--data``, default ``../shared/data/histology`` beside the checkout, or
``$NAPARI_DISCREG_HISTOLOGY``): rat kidney (HE -> PanCytokeratin) and lung lesion (HE ->
proSPC) with landmarks placed by people, plus BIRL's artificial set (rigid, affine,
elastic; a few landmarks each, reported but kept out of the summary). Both images of a
pair are resized by one factor so that the fixed image's long side is ``--size`` px; the
landmarks are scaled alike. Our variants get RGB float arrays (H, W, 3) in [0, 1] at their
own (different) sizes; the peers get grayscale luminance (``skimage.color.rgb2gray``) at
their own sizes, spacing 1 and origin 0, as their users run them.

Metric per pair: TRE of a landmark = distance between the fixed landmark mapped through
the registration and the moving landmark (px at working size); the median, the median
relative TRE (TRE / diagonal of the fixed image) and the robustness (share of landmarks
whose TRE is smaller than without registration), and the seconds the registration took.
Our field ``u`` (2, Hf, Wf) maps a fixed point ``p`` to ``p + u(p)`` (bilinear); the
peers' transforms are sampled the same way (elastix, SimpleITK: their displacement field
on the fixed grid) or map the points themselves (ANTs). Before anything is timed, a
self-check registers a known translation between images of different sizes with every
selected peer and asserts that each maps points in the right direction.

Synthetic table: T1 held-out test slices of the template (fixed) against T2-like and
PD-like renderings of the same slice moved by a known affine (rotation 0, +-15, +-30 or
180 degrees, scale 0.85 or 1.15, shift up to 20 % of the side, seeded); end-point error
over the brain (points whose true position lies inside the moving image), and the share
of pairs under 1 px.

Variants (``--variants``; each is ``napari_discreg.register(fixed, moving, **kwargs)``,
the kwargs below; a variant that raises is reported as "error: ..." in its row):

* ``default``: ``{}`` (what ``register()`` does unless told otherwise)
* ``prealign-only``: ``{"method": "none"}`` (the pre-alignment alone)
* ``no-prealign``: ``{"prealign": "none"}``
* ``network``: ``{"method": "network"}``
* ``network+bspline``: ``{"method": "network+bspline"}``
* ``prealign-rigid``: ``{"prealign": "rigid"}``
* ``prealign-similarity``: ``{"prealign": "similarity"}``

Default selection: default, prealign-only, no-prealign, network. ``--extra-variant
'name=JSON'`` adds one (a ``"refine"`` object becomes a ``BSplineConfig``).

Peers (``--peers``; optional packages, a missing one gives a "not installed" row):

* ``elastix``: itk-elastix, the default affine then B-spline parameter maps (4
  resolutions, AdvancedMattesMutualInformation, final grid 10 px with the bending-energy
  penalty), centre-of-gravity initialisation.
* ``ants``: antspyx, ``ants.registration(fixed, moving, type_of_transform="SyN")``
  (its affine stage, then SyN; ``pip install "napari-discreg[ants]"``).
* ``simpleitk``: centred initialiser (MOMENTS), affine, Mattes MI, 3 levels.
* ``simpleitk-bspline``: the same, then a cubic B-spline (Mattes MI, L-BFGS-B, 2 levels;
  not run unless named: 20 to 60 s per pair).

Threads: ``--threads`` (default 1) for torch, BLAS, ITK (itk-elastix and SimpleITK) and
ANTs (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``), so the seconds per pair compare.
``--quick``: 4 synthetic pairs, no ANTs (development).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from _protocol import update_section
from scipy import ndimage as ndi
from skimage.color import rgb2gray
from threadpoolctl import threadpool_limits

import napari_discreg as nd
from napari_discreg.core.config import DataConfig
from napari_discreg.core.data import template as data

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling module, also when this file is loaded by path
    sys.path.insert(0, str(HERE))
import _landmark_data as ld  # noqa: E402

DOCS = HERE.parent / "docs"
SECTION = "landmarks"

Mapping = ld.Mapping
Method = Callable[[np.ndarray, np.ndarray], Mapping]
"""(fixed, moving) -> the mapping of fixed points into the moving image."""

VARIANTS: dict[str, dict] = {
    "default": {},
    "prealign-only": {"method": "none"},
    "no-prealign": {"prealign": "none"},
    "network": {"method": "network"},
    "bspline": {"method": "bspline"},
    "network+bspline": {"method": "network+bspline"},
    "prealign-rigid": {"prealign": "rigid"},
    "prealign-similarity": {"prealign": "similarity"},
}
"""Variant name -> keyword arguments of ``napari_discreg.register``."""
DEFAULT_VARIANTS = ("default", "bspline", "network+bspline", "prealign-only", "no-prealign")
"""The ablation: the default (affine pre-alignment, then the network coarse to fine)
against each stage swapped or left out."""

PEER_LABELS = {
    "elastix": "elastix (affine + B-spline, MI, 4 levels)",
    "ants": "ANTs SyN (affine + SyN)",
    "simpleitk": "SimpleITK (affine, MI, 3 levels)",
    "simpleitk-bspline": "SimpleITK (affine + B-spline, MI)",
}
DEFAULT_PEERS = ("elastix", "ants", "simpleitk")  # simpleitk-bspline: 20-60 s per pair
BASELINE = "no registration"
REFERENCE = "elastix"

ANGLES = (0.0, 15.0, -15.0, 30.0, -30.0, 180.0)
SCALES = (0.85, 1.15)
MAX_SHIFT = 0.2  # of the side
CONTRASTS = ("t2", "pd")


class NotInstalled(Exception):
    """An optional peer's package is missing."""


# --------------------------------------------------------------------------- threads


def set_threads(threads: int) -> None:
    """One thread count for torch, ITK (itk-elastix, SimpleITK) and ANTs.

    ANTs reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` when its library starts, so this
    runs before ``ants`` is imported.
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:  # optional peers: imported here only to set their thread counts
        import itk

        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    except ImportError:
        pass
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    except ImportError:
        pass


# --------------------------------------------------------------------------- peers


def _gray(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    return np.ascontiguousarray(rgb2gray(img) if img.ndim == 3 else img, dtype=np.float32)


def _xy_field_to_rowcol(field_hw2: np.ndarray) -> np.ndarray:
    arr = np.asarray(field_hw2, dtype=np.float64)
    return np.stack([arr[..., 1], arr[..., 0]])


def elastix_peer(fixed, moving, *, threads: int = 1, seed: int = 0) -> Mapping:
    """elastix as its users run it: default affine then B-spline maps, 4 resolutions,
    centre-of-gravity initialisation; the dense field on the fixed grid."""
    try:  # optional peer
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018 - lazy attribute: loads elastix
    except (ImportError, AttributeError) as exc:
        raise NotInstalled("itk-elastix") from exc
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    f_img, m_img = itk.image_from_array(_gray(fixed)), itk.image_from_array(_gray(moving))
    for img in (f_img, m_img):
        img.SetSpacing((1.0, 1.0))
        img.SetOrigin((0.0, 0.0))
    params = itk.ParameterObject.New()
    affine = params.GetDefaultParameterMap("affine", 4)
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    bspline = params.GetDefaultParameterMap("bspline", 4)
    for pmap in (affine, bspline):
        pmap["WriteResultImage"] = ["false"]
        pmap["RandomSeed"] = [str(int(seed))]
        params.AddParameterMap(pmap)
    reg = itk.ElastixRegistrationMethod.New(f_img, m_img)
    reg.SetParameterObject(params)
    reg.SetLogToConsole(False)
    reg.UpdateLargestPossibleRegion()
    transform = reg.GetTransformParameterObject()
    # transformix writes deformationField.nii to its output folder: a throw-away one.
    # The field lies on the fixed grid (Size/Spacing/Origin of the transform parameters).
    with tempfile.TemporaryDirectory(prefix="landmarks-transformix-") as tmp:
        field = itk.transformix_deformation_field(
            m_img, transform, output_directory=tmp, log_to_console=False
        )
        u = _xy_field_to_rowcol(itk.array_from_image(field))
    if u.shape[1:] != np.shape(fixed)[:2]:
        raise RuntimeError(f"elastix field {u.shape} is not on the fixed grid")
    return ld.field_mapping(u)


def _sitk_images(sitk, fixed, moving):
    f_img = sitk.GetImageFromArray(_gray(fixed))
    m_img = sitk.GetImageFromArray(_gray(moving))
    for img in (f_img, m_img):
        img.SetSpacing((1.0, 1.0))
        img.SetOrigin((0.0, 0.0))
    return f_img, m_img


def simpleitk_peer(
    fixed, moving, *, threads: int = 1, seed: int = 0, bspline: bool = False
) -> Mapping:
    """SimpleITK: centred initialiser (MOMENTS), affine with Mattes MI on 3 levels
    (shrink 4, 2, 1), optionally then a cubic B-spline (about 32 px between control
    points, L-BFGS-B, 2 levels); the dense field on the fixed grid."""
    try:  # optional peer
        import SimpleITK as sitk
    except ImportError as exc:
        raise NotInstalled("SimpleITK") from exc
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    f_img, m_img = _sitk_images(sitk, fixed, moving)
    initial = sitk.CenteredTransformInitializer(
        f_img, m_img, sitk.AffineTransform(2), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(int(threads))
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.5, int(seed) + 1)  # seed 0 = wall clock
    reg.SetInterpolator(sitk.sitkLinear)
    # gradient descent with its learning rate estimated every iteration, half the pixels
    # sampled: the best of 11 optimiser settings tried on lung-lesion, artificial-rigid,
    # one synthetic pair and the self-check pair (chosen in the peer's favour; regular-step
    # descent, a learning rate estimated once or 20 % sampling ended 3 to 58 px away on
    # one of them). Still about 3 px off on the self-check's pure translation.
    reg.SetOptimizerAsGradientDescent(
        learningRate=1.0,
        numberOfIterations=300,
        convergenceMinimumValue=1e-7,
        convergenceWindowSize=20,
        estimateLearningRate=reg.EachIteration,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    transform = reg.Execute(f_img, m_img)
    if bspline:
        mesh = [max(2, round(s / 32)) for s in f_img.GetSize()]
        local = sitk.BSplineTransformInitializer(f_img, mesh, 3)
        reg2 = sitk.ImageRegistrationMethod()
        reg2.SetNumberOfThreads(int(threads))
        reg2.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg2.SetMetricSamplingStrategy(reg2.RANDOM)
        reg2.SetMetricSamplingPercentage(0.2, int(seed) + 1)
        reg2.SetInterpolator(sitk.sitkLinear)
        reg2.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5,
            numberOfIterations=100,
            maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=400,
            costFunctionConvergenceFactor=1e7,
        )
        reg2.SetShrinkFactorsPerLevel([2, 1])
        reg2.SetSmoothingSigmasPerLevel([1.0, 0.0])
        reg2.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg2.SetMovingInitialTransform(transform)
        reg2.SetInitialTransform(local, inPlace=True)
        reg2.Execute(f_img, m_img)
        # p -> affine(bspline(p)): a composite applies its last transform first
        transform = sitk.CompositeTransform([transform, local])
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        f_img.GetSize(),
        f_img.GetOrigin(),
        f_img.GetSpacing(),
        f_img.GetDirection(),
    )
    return ld.field_mapping(_xy_field_to_rowcol(sitk.GetArrayFromImage(field)))


def ants_peer(fixed, moving, *, threads: int = 1, seed: int = 0) -> Mapping:
    """ANTs as its users run it: ``ants.registration(f, m, type_of_transform="SyN")``.

    Points: ``fwdtransforms`` resample the moving image onto the fixed grid, i.e. they
    map a fixed point to the moving image, and ``ants.apply_transforms_to_points`` applies
    a list to points in that same direction (the reverse of the direction the *image*
    travels: "point mapping goes the opposite direction of image mapping"), so fixed
    landmarks go through ``fwdtransforms``. Checked by :func:`self_check` on a known
    translation between images of different sizes. ``ants.from_numpy`` keeps the array
    axes, so ANTs' ``x`` is our row and ``y`` our column.
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    try:  # optional peer (its import also starts its own ITK)
        import ants
        import pandas as pd
    except ImportError as exc:
        raise NotInstalled("antspyx") from exc
    config = getattr(ants, "config", None)
    if config is not None and hasattr(config, "set_ants_deterministic"):
        config.set_ants_deterministic(False, int(seed) + 1)  # passes --random-seed
    f_img = ants.from_numpy(_gray(fixed))
    m_img = ants.from_numpy(_gray(moving))
    out = ants.registration(f_img, m_img, type_of_transform="SyN")
    files = list(out["fwdtransforms"])  # files in a temporary folder ANTs keeps

    def mapping(points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        frame = pd.DataFrame({"x": p[:, 0], "y": p[:, 1]})
        mapped = ants.apply_transforms_to_points(2, frame, files)
        return np.stack([mapped["x"].to_numpy(), mapped["y"].to_numpy()], axis=1)

    return mapping


PEERS: dict[str, Callable[..., Mapping]] = {
    "elastix": elastix_peer,
    "ants": ants_peer,
    "simpleitk": simpleitk_peer,
    "simpleitk-bspline": lambda f, m, **kw: simpleitk_peer(f, m, bspline=True, **kw),
}


# --------------------------------------------------------------------------- self-check


def _blobs(shape: tuple[int, int], offset: tuple[float, float], seed: int = 7) -> np.ndarray:
    """Smooth random blobs ``g(r - offset0, c - offset1)`` on a grid of ``shape``: the same
    scene, its origin moved by ``offset``."""
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    img = np.zeros(shape, dtype=np.float64)
    for _ in range(40):
        r0, c0 = rng.uniform(28, 100), rng.uniform(28, 120)  # inside both images
        s, a = rng.uniform(3, 9), rng.uniform(0.3, 1.0)
        img += a * np.exp(-((rr - offset[0] - r0) ** 2 + (cc - offset[1] - c0) ** 2) / (2 * s * s))
    return (img / img.max()).astype(np.float32)


SELF_CHECK_SHIFT = (5.0, -7.0)
"""The self-check's true map: fixed point p -> moving point p + shift (row, col)."""


def self_check_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fixed (128, 148), moving (140, 136), points): ``moving(p + shift) = fixed(p)``."""
    fixed = _blobs((128, 148), (0.0, 0.0))
    moving = _blobs((140, 136), SELF_CHECK_SHIFT)
    rr, cc = np.meshgrid(np.linspace(30, 95, 5), np.linspace(30, 110, 5), indexing="ij")
    return fixed, moving, np.stack([rr.ravel(), cc.ravel()], axis=1)


def self_check(peers: dict[str, Callable[..., Mapping]], threads: int) -> dict[str, str]:
    """Register the self-check pair with every peer and assert that each maps the fixed
    points in the right direction: nearer to ``p + shift`` than to ``p - shift`` or to
    either with the axes swapped (the sign, the axes and the grid of its output), and
    within 1 px for the deformable peers (the affine-only SimpleITK row is reported with
    its error: its optimiser ends about 3 px off)."""
    fixed, moving, points = self_check_pair()
    t = np.asarray(SELF_CHECK_SHIFT)
    wrong = {"-shift": -t, "swapped": t[::-1], "-swapped": -t[::-1]}
    status = {}
    for name, peer in peers.items():
        try:
            mapping = peer(fixed, moving, threads=threads)
        except NotInstalled as exc:
            status[name] = f"not installed ({exc})"
            continue
        moved = mapping(points) - points
        error = float(np.median(np.linalg.norm(moved - t, axis=1)))
        for label, w in wrong.items():
            other = float(np.median(np.linalg.norm(moved - w, axis=1)))
            assert error < other, (
                f"self-check: {name} maps fixed points nearer to p {label} ({other:.2f} px) "
                f"than to p + shift ({error:.2f} px): its direction or axes are wrong"
            )
        if name != "simpleitk":
            assert error < 1.0, f"self-check: {name} recovers the shift {error:.2f} px off"
        status[name] = f"ok (median error {error:.2f} px)"
        print(f"self-check {name}: {status[name]}", flush=True)
    return status


# --------------------------------------------------------------------------- our variants


def variant_kwargs(kwargs: dict) -> dict:
    """JSON keyword arguments -> register()'s: a ``"refine"`` object becomes a BSplineConfig."""
    out = dict(kwargs)
    if isinstance(out.get("refine"), dict):
        out["refine"] = nd.BSplineConfig(**out["refine"])
    return out


def make_variant(kwargs: dict, model=None, device=None) -> Callable[..., np.ndarray]:
    """``(fixed, moving) -> displacement (2, Hf, Wf)`` of ``register(fixed, moving,
    **kwargs)`` (with ``model`` and ``device`` when given)."""
    extra = variant_kwargs(kwargs)
    if model is not None:
        extra.setdefault("model", model)
    if device is not None:
        extra.setdefault("device", device)

    def variant(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
        return nd.register(fixed, moving, **extra).displacement

    return variant


def build_variants(
    names, extra: list[str] | None = None, model=None, device=None
) -> dict[str, tuple[dict, Callable[..., np.ndarray]]]:
    """name -> (kwargs, displacement function) for ``names`` of :data:`VARIANTS` and the
    ``'name=JSON'`` strings of ``extra``."""
    specs: dict[str, dict] = {}
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        specs[name] = VARIANTS[name]
    for text in extra or []:
        name, sep, blob = text.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--extra-variant expects 'name=JSON', got {text!r}")
        kwargs = json.loads(blob) if blob.strip() else {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"--extra-variant {name}: the JSON must be an object, got {blob!r}")
        specs[name.strip()] = kwargs
    return {name: (kw, make_variant(kw, model, device)) for name, kw in specs.items()}


def field_method(variant: Callable[..., np.ndarray]) -> Method:
    """A displacement function as a :data:`Method`, its field checked to be on the fixed
    grid."""

    def method(fixed: np.ndarray, moving: np.ndarray) -> Mapping:
        u = np.asarray(variant(fixed, moving))
        want = (2, *np.shape(fixed)[:2])
        if u.shape != want:
            raise ValueError(f"the displacement has shape {u.shape}, expected {want}")
        return ld.field_mapping(u)

    return method


def peer_method(peer: Callable[..., Mapping], threads: int) -> Method:
    def method(fixed: np.ndarray, moving: np.ndarray) -> Mapping:
        return peer(fixed, moving, threads=threads)

    return method


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def run_method(method: Method, fixed, moving) -> tuple[Mapping | None, dict]:
    """Run one method, timed; ``(mapping, record)`` with ``record`` holding the seconds, or
    ``(None, {"error": ...})`` / ``(None, {"status": "not installed"})``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            mapping = method(fixed, moving)
        except NotInstalled as exc:
            return None, {"status": "not installed", "error": f"not installed ({exc})"}
        except Exception as exc:  # a failing variant is a row, not a crash
            traceback.print_exc(limit=3)
            return None, {"error": f"error: {_short(exc)}"}
        seconds = time.perf_counter() - t0
    record: dict = {"seconds": seconds}
    messages = sorted({_short(w.message) for w in caught if w.category is not DeprecationWarning})
    if messages:
        record["warnings"] = messages
    return mapping, record


# --------------------------------------------------------------------------- real pairs


def run_real(
    pairs: list[ld.LandmarkPair], methods: dict[str, tuple[Method, bool]]
) -> dict[str, dict]:
    """Every method on every pair (the order rotates from pair to pair, so load on a shared
    machine hits them alike); ``methods``: name -> (method, wants RGB)."""
    out: dict[str, dict] = {}
    names = list(methods)
    for i, pair in enumerate(pairs):
        gray_f, gray_m = _gray(pair.fixed), _gray(pair.moving)
        rows: dict[str, dict] = {BASELINE: {**ld.pair_metrics(pair, ld.identity_mapping)}}
        rows[BASELINE]["seconds"] = 0.0
        for name in names[i % len(names) :] + names[: i % len(names)]:
            method, rgb = methods[name]
            f, m = (pair.fixed, pair.moving) if rgb else (gray_f, gray_m)
            mapping, record = run_method(method, f, m)
            if mapping is not None:
                try:
                    record.update(ld.pair_metrics(pair, mapping))
                except Exception as exc:
                    record = {"error": f"error: {_short(exc)}"}
            rows[name] = record
            print(f"{pair.name:20s} {name:22s} {_row_text(record)}", flush=True)
        out[pair.name] = {
            "real": pair.real,
            "fixed_shape": list(pair.fixed.shape),
            "moving_shape": list(pair.moving.shape),
            "scale": pair.scale,
            "diagonal": pair.diagonal,
            "landmarks": len(pair.indices),
            "rows": {name: rows[name] for name in [BASELINE, *names]},
        }
    return out


def _row_text(record: dict) -> str:
    if "median_tre" not in record:
        return record.get("error", "?")
    return (
        f"median TRE {record['median_tre']:6.2f} px, rTRE {record['median_rtre']:.4f}, "
        f"robustness {record['robustness']:.2f}, {record['seconds']:.2f} s"
    )


def summarise(real: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """Per method, the mean over the real stain pairs of the per-pair numbers, and the
    ratios to elastix."""
    real_pairs = [p for p in real.values() if p["real"]]
    summary: dict[str, dict] = {}
    for name in [BASELINE, *names]:
        records = [p["rows"][name] for p in real_pairs if name in p["rows"]]
        failed = [r for r in records if "median_tre" not in r]
        if not records:
            continue
        if failed:
            summary[name] = {"error": failed[0].get("error", "error"), "pairs": len(records)}
            continue
        summary[name] = {
            key: float(np.mean([r[key] for r in records]))
            for key in ("median_tre", "median_rtre", "robustness", "seconds")
        }
        summary[name]["pairs"] = len(records)
    ref = summary.get(REFERENCE, {})
    for row in summary.values():
        if "median_tre" in row and "median_tre" in ref:
            row["tre_ratio"] = row["median_tre"] / ref["median_tre"]
            row["speedup"] = ref["seconds"] / row["seconds"] if row["seconds"] > 0 else None
    return summary


# --------------------------------------------------------------------------- synthetic


def affine_matrix(angle_deg: float, scale: float) -> np.ndarray:
    """``scale * R(angle)`` acting on (row, col) vectors (positive: counter-clockwise on
    screen)."""
    a = np.deg2rad(angle_deg)
    return scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def synthetic_pairs(n: int, size: int, seed: int = 2024) -> list[dict]:
    """``n`` pairs: fixed = T1 test slice; moving = the T2-like (even pairs) or PD-like (odd)
    rendering of the same slice, moved by ``p -> c + A (p - c) + t``: pair ``2k`` and
    ``2k + 1`` share slice and affine (angle ``ANGLES[k % 6]``, scale ``SCALES[k % 2]``,
    a shift uniform in +-20 % of the side per axis, seeded by ``(seed, k)``)."""
    cfg = DataConfig(size=size)
    template = data.load_template(size)
    lo, hi = cfg.test_slices
    groups = (n + 1) // 2
    centre = np.array([(size - 1) / 2.0] * 2)
    rr, cc = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    grid = np.stack([rr, cc]).reshape(2, -1).astype(np.float64)
    pairs = []
    for i in range(n):
        k = i // 2
        geo = np.random.default_rng([seed, k])
        index = lo + (k * (hi - lo)) // max(groups, 1)
        angle, scale = ANGLES[k % len(ANGLES)], SCALES[k % len(SCALES)]
        shift = geo.uniform(-MAX_SHIFT, MAX_SHIFT, size=2) * size
        contrast = CONTRASTS[i % len(CONTRASTS)]
        rng = np.random.default_rng([seed, k, i % 2])
        fixed = data.synthesize_contrast(template, index, "t1", rng, cfg)
        base = data.synthesize_contrast(template, index, contrast, rng, cfg)
        a = affine_matrix(angle, scale)
        inv = np.linalg.inv(a)
        # moving(q) = base(A^-1 (q - c - t) + c): out[q] = in[inv q + offset]
        offset = centre - inv @ (centre + shift)
        moving = ndi.affine_transform(base, inv, offset=offset, order=1, mode="constant", cval=0)
        target = (a @ (grid - centre[:, None]) + (centre + shift)[:, None]).reshape(2, size, size)
        truth = (target - grid.reshape(2, size, size)).astype(np.float32)
        inside = (
            (target[0] >= 0) & (target[0] <= size - 1) & (target[1] >= 0) & (target[1] <= size - 1)
        )
        mask = (template.mask[index] > 0) & inside
        pairs.append(
            {
                "index": int(index),
                "contrast": contrast,
                "angle": float(angle),
                "scale": float(scale),
                "shift": [float(s) for s in shift],
                "fixed": fixed.astype(np.float32),
                "moving": np.clip(moving, 0, 1).astype(np.float32),
                "truth": truth,
                "mask": mask,
            }
        )
    return pairs


def unmoved_pairs(size: int = 128, seed: int = 2024) -> list[dict]:
    """Pairs with no motion at all: T1 vs T2-like and vs PD-like renderings of four test
    slices, and scikit-image's immunohistochemistry image split into its hematoxylin and
    DAB channels (colour deconvolution), as the issue tried them in napari."""
    from skimage import data as skdata
    from skimage.color import rgb2hed

    cfg = DataConfig(size=size)
    template = data.load_template(size)
    lo, hi = cfg.test_slices
    out = []
    for k in range(4):
        index = lo + (k * (hi - lo)) // 4
        rng = np.random.default_rng([seed, 99, k])
        t1 = data.synthesize_contrast(template, index, "t1", rng, cfg)
        fg = template.mask[index] > 0
        for contrast in CONTRASTS:
            moving = data.synthesize_contrast(template, index, contrast, rng, cfg)
            out.append(
                {
                    "name": f"T1 / {contrast} slice {index}",
                    "fixed": t1,
                    "moving": moving,
                    "mask": fg,
                }
            )
    hed = rgb2hed(skdata.immunohistochemistry())
    h, dab = hed[..., 0], hed[..., 2]
    out.append(
        {"name": "IHC hematoxylin / DAB", "fixed": h, "moving": dab, "mask": np.ones(h.shape, bool)}
    )
    return out


def run_unmoved(
    pairs: list[dict], variants: dict[str, tuple[dict, Callable]], model, device
) -> dict:
    """Per variant: mean |u| over the foreground (should be ~0) and the largest |u|, and how
    many results warned."""
    rows = {}
    for name, (kwargs, _) in variants.items():
        extra = variant_kwargs(kwargs)
        extra.setdefault("model", model)
        extra.setdefault("device", device)
        means, maxes, warned = [], [], 0
        for pair in pairs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = nd.register(pair["fixed"], pair["moving"], **extra)
            mag = np.linalg.norm(res.displacement, axis=0)
            means.append(float(mag[pair["mask"]].mean()))
            maxes.append(float(mag.max()))
            warned += bool(res.warnings)
        rows[name] = {
            "mean_u_template": float(np.mean(means[:-1])),
            "mean_u_ihc": means[-1],
            "max_u": float(np.max(maxes)),
            "warned": warned,
            "pairs": len(pairs),
        }
        print(
            f"unmoved {name:22s} mean |u| template {rows[name]['mean_u_template']:.3f} px, "
            f"IHC {rows[name]['mean_u_ihc']:.3f} px",
            flush=True,
        )
    return rows


def run_synthetic(pairs: list[dict], methods: dict[str, tuple[Method, bool]]) -> dict:
    """EPE over the valid brain points of every pair, per method (the 2D images go to every
    method as they are: no RGB here)."""
    names = list(methods)
    rows: dict[str, dict] = {BASELINE: {"epe": [], "seconds": []}}
    rows.update({name: {"epe": [], "seconds": [], "errors": []} for name in names})
    for i, pair in enumerate(pairs):
        points = np.argwhere(pair["mask"]).astype(np.float64)
        truth = points + pair["truth"][:, pair["mask"]].T
        rows[BASELINE]["epe"].append(float(np.linalg.norm(points - truth, axis=1).mean()))
        rows[BASELINE]["seconds"].append(0.0)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            method, _ = methods[name]
            mapping, record = run_method(method, pair["fixed"], pair["moving"])
            row = rows[name]
            if mapping is None:
                row["epe"].append(None)
                row["seconds"].append(None)
                row["errors"].append(record.get("error", "error"))
                continue
            epe = float(np.linalg.norm(mapping(points) - truth, axis=1).mean())
            row["epe"].append(epe)
            row["seconds"].append(record["seconds"])
            print(
                f"synthetic {i:2d} {pair['contrast']} {pair['angle']:+6.0f} deg "
                f"{name:22s} EPE {epe:7.2f} px, {record['seconds']:.2f} s",
                flush=True,
            )
    for row in rows.values():
        ok = [e for e in row["epe"] if e is not None]
        secs = [s for s in row["seconds"] if s is not None]
        row["pairs"] = len(ok)
        if len(ok) < len(row["epe"]):
            row["status"] = row["errors"][0] if row.get("errors") else "error"
        if ok:
            row["mean_epe"] = float(np.mean(ok))
            row["median_epe"] = float(np.median(ok))
            row["under_1px"] = float(np.mean(np.asarray(ok) < 1.0))
            row["seconds_mean"] = float(np.mean(secs))
            for contrast in CONTRASTS:
                vals = [
                    e
                    for e, p in zip(row["epe"], pairs, strict=True)
                    if p["contrast"] == contrast and e is not None
                ]
                if vals:
                    row[f"mean_epe_{contrast}"] = float(np.mean(vals))
    return {
        "pairs": [
            {k: p[k] for k in ("index", "contrast", "angle", "scale", "shift")}
            | {"points": int(p["mask"].sum())}
            for p in pairs
        ],
        "rows": rows,
    }


# --------------------------------------------------------------------------- report


def machine_facts(threads: int) -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for dist in ("napari-discreg", "itk-elastix", "SimpleITK", "antspyx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "threads": threads,
        "load_average_start": list(os.getloadavg()),
        "versions": versions,
    }


def _label(name: str, kinds: dict[str, str]) -> str:
    if kinds.get(name) == "peer":
        return PEER_LABELS.get(name, name)
    if kinds.get(name) == "variant":
        return f"register() `{name}`"
    return name


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(result: dict) -> str:
    meta = result["meta"]
    kinds = {name: spec["kind"] for name, spec in result["methods"].items()}
    mf = meta["machine"]
    lines = [
        "## Real landmarks (ANHIR metrics): register() vs elastix, ANTs and SimpleITK",
        "",
        f"Written by `{meta['command']}` in {meta['wall_seconds'] / 60:.1f} min on "
        f"{mf['cpu']} ({mf['cpus']} CPUs, load average {mf['load_average_start'][0]:.1f} at "
        f"the start), {mf['threads']} thread(s) for torch, BLAS, ITK and ANTs alike; "
        + ", ".join(f"{k} {v}" for k, v in mf["versions"].items() if v)
        + ".",
        "",
        f"Protocol: both images of a pair resized by one factor so that the fixed image's "
        f"long side is {meta['size']} px, landmarks (placed by people) scaled alike. "
        "register() gets the RGB images, the peers their luminance, each image at its own "
        "size. TRE = distance between the fixed landmark mapped through the registration "
        "and the moving landmark (px at working size); rTRE = TRE / diagonal of the fixed "
        "image; robustness = share of landmarks closer than without registration. "
        "Summary: mean over the two real stain pairs of the per-pair medians; "
        "TRE / elastix < 1 is more accurate, elastix time / this > 1 is faster. "
        "Self-check of the peers' point mapping on a known translation: "
        + "; ".join(f"{k} {v}" for k, v in meta["self_check"].items())
        + ".",
        "",
        "| method | median TRE (px) | median rTRE | robustness | s / pair | TRE / elastix "
        "| elastix time / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["summary"].items():
        if "median_tre" not in row:
            lines.append(f"| {_label(name, kinds)} | {row.get('error', '')} | | | | | |")
            continue
        speed = row.get("speedup")
        lines.append(
            f"| {_label(name, kinds)} | {row['median_tre']:.2f} | {row['median_rtre']:.4f} | "
            f"{row['robustness']:.2f} | {row['seconds']:.2f} | "
            f"{_cell(row.get('tre_ratio'), '.2f')} | "
            f"{'' if speed is None or name == BASELINE else format(speed, '.1f') + 'x'} |"
        )
    for pair_name, pair in result["real"].items():
        kind = "real stain pair" if pair["real"] else "BIRL artificial (not in the summary)"
        lines += [
            "",
            f"**{pair_name}** ({kind}): fixed {pair['fixed_shape'][0]}x"
            f"{pair['fixed_shape'][1]}, moving {pair['moving_shape'][0]}x"
            f"{pair['moving_shape'][1]} px, {pair['landmarks']} landmarks, scale "
            f"{pair['scale']:.3f}.",
            "",
            "| method | median TRE (px) | median rTRE | robustness | max TRE (px) | s |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in pair["rows"].items():
            if "median_tre" not in row:
                lines.append(f"| {_label(name, kinds)} | {row.get('error', '')} | | | | |")
                continue
            lines.append(
                f"| {_label(name, kinds)} | {row['median_tre']:.2f} | {row['median_rtre']:.4f}"
                f" | {row['robustness']:.2f} | {row['max_tre']:.1f} | {row['seconds']:.2f} |"
            )
    syn = result.get("synthetic")
    if syn:
        s = syn["settings"]
        lines += [
            "",
            f"### Synthetic affines on the template ({len(syn['pairs'])} pairs, {s['size']} px)",
            "",
            "Fixed: a T1 held-out test slice; moving: the T2-like or PD-like rendering of the "
            "same slice moved by a known affine about the centre (rotation "
            f"{', '.join(f'{a:g}' for a in ANGLES)} degrees, scale "
            f"{' or '.join(f'{x:g}' for x in SCALES)}, shift uniform in +-"
            f"{MAX_SHIFT:.0%} of the side, seed {s['seed']}). EPE: mean distance between the "
            "mapped and the true position over the brain points whose true position lies in "
            "the moving image; mean over pairs, and the share of pairs under 1 px.",
            "",
            "| method | EPE T2 (px) | EPE PD (px) | mean EPE (px) | median EPE (px) | "
            "pairs < 1 px | s / pair |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in syn["rows"].items():
            if "mean_epe" not in row:
                lines.append(f"| {_label(name, kinds)} | {row.get('status', '')} | | | | | |")
                continue
            note = f" ({row['status']})" if row.get("status") else ""
            lines.append(
                f"| {_label(name, kinds)}{note} | {_cell(row.get('mean_epe_t2'), '.2f')} | "
                f"{_cell(row.get('mean_epe_pd'), '.2f')} | {row['mean_epe']:.2f} | "
                f"{row['median_epe']:.2f} | {row['under_1px']:.0%} | "
                f"{row['seconds_mean']:.2f} |"
            )
    unmoved = result.get("unmoved")
    if unmoved:
        lines += [
            "",
            "### Unmoved multimodal pairs: no invented motion",
            "",
            "No motion at all: T1 against T2-like and PD-like renderings of four test slices "
            "(128 px; mean |u| over the brain) and scikit-image's immunohistochemistry image "
            "split into hematoxylin and DAB (colour deconvolution, 512 px; mean |u| over the "
            'image). Goal: mean |u| at most 0.2 px. "warned": results whose `warnings` '
            "were not empty.",
            "",
            "| method | mean \\|u\\| template (px) | mean \\|u\\| IHC (px) | max \\|u\\| (px) | warned |",
            "|---|---|---|---|---|",
        ]
        for name, row in unmoved.items():
            lines.append(
                f"| {_label(name, kinds)} | {row['mean_u_template']:.3f} | "
                f"{row['mean_u_ihc']:.3f} | {row['max_u']:.2f} | {row['warned']} of "
                f"{row['pairs']} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=None, help="histology data folder")
    ap.add_argument("--size", type=int, default=448, help="fixed image's long side (px)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="*", default=None, help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--extra-variant", action="append", default=[], metavar="NAME=JSON")
    ap.add_argument("--peers", nargs="*", default=None, choices=list(PEERS))
    ap.add_argument(
        "--pairs", nargs="*", default=None, choices=[p.name for p in ld.PAIRS], metavar="PAIR"
    )
    ap.add_argument("--synthetic-pairs", type=int, default=None, help="default 12 (quick 4)")
    ap.add_argument("--synthetic-size", type=int, default=128)
    ap.add_argument("--synthetic-peers", nargs="*", default=None, choices=list(PEERS))
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--quick", action="store_true", help="4 synthetic pairs, no ANTs")
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    ap.add_argument("--out-dir", type=Path, default=DOCS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(given)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    data_dir = args.data or ld.default_data_dir()
    specs = [p for p in ld.PAIRS if args.pairs is None or p.name in args.pairs]
    missing = ld.missing_files(data_dir, specs)
    if missing:
        print(
            f"landmarks: the histology data is missing from {data_dir} ({len(missing)} files, "
            f"e.g. {missing[0]}); pass --data DIR or set ${ld.ENV_DATA}",
            file=sys.stderr,
        )
        return 2
    t_start = time.perf_counter()
    set_threads(args.threads)
    peers = args.peers if args.peers is not None else list(DEFAULT_PEERS)
    if args.quick and args.peers is None:
        peers = [p for p in peers if p != "ants"]
    syn_peers = args.synthetic_peers if args.synthetic_peers is not None else peers
    n_syn = args.synthetic_pairs if args.synthetic_pairs is not None else (4 if args.quick else 12)
    names = list(args.variants) if args.variants is not None else list(DEFAULT_VARIANTS)

    with threadpool_limits(args.threads):
        device = torch.device("cpu")
        model = nd.load_model(args.model, device=device)
        variants = build_variants(names, args.extra_variant, model=model, device=device)
        check = self_check({name: PEERS[name] for name in peers}, args.threads)

        methods: dict[str, tuple[Method, bool]] = {}
        specs_out: dict[str, dict] = {BASELINE: {"kind": "baseline"}}
        fixed0 = self_check_pair()[0]
        for name, (kwargs, fn) in variants.items():
            with warnings.catch_warnings():  # warm-up: first-call costs are not timed
                warnings.simplefilter("ignore")
                try:
                    fn(fixed0, fixed0)
                except Exception:
                    pass
            methods[name] = (field_method(fn), True)
            specs_out[name] = {"kind": "variant", "kwargs": kwargs}
        for name in peers:
            methods[name] = (peer_method(PEERS[name], args.threads), False)
            specs_out[name] = {"kind": "peer", "label": PEER_LABELS[name]}

        pairs = ld.load_pairs(data_dir, args.size, specs)
        real = run_real(pairs, methods)
        summary = summarise(real, list(methods))

        synthetic = None
        if n_syn > 0:
            syn_methods = {
                k: v for k, v in methods.items() if specs_out[k]["kind"] != "peer" or k in syn_peers
            }
            syn_pairs = synthetic_pairs(n_syn, args.synthetic_size, args.seed)
            synthetic = run_synthetic(syn_pairs, syn_methods)
            synthetic["settings"] = {"size": args.synthetic_size, "seed": args.seed}
        unmoved = None if args.quick else run_unmoved(unmoved_pairs(), variants, model, device)

    command = " ".join(["python benchmarks/landmarks.py", *(shlex.quote(a) for a in given)])
    facts = machine_facts(args.threads)
    facts["load_average_end"] = list(os.getloadavg())
    result = {
        "meta": {
            "command": command,
            "size": args.size,
            "data": str(data_dir),
            "quick": bool(args.quick),
            "wall_seconds": time.perf_counter() - t_start,
            "machine": facts,
            "self_check": check,
        },
        "methods": specs_out,
        "real": real,
        "summary": summary,
        "synthetic": synthetic,
        "unmoved": unmoved,
    }
    text = markdown(result)
    print(text)
    if not args.no_write:
        out = Path(args.out_dir)
        update_section(out / "benchmarks.md", SECTION, text)
        (out / "landmarks.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
