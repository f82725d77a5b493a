"""Classical registration peers for the benchmark: elastix (itk-elastix) and SimpleITK.

Both register ``moving`` to ``fixed`` with a multi-resolution cubic B-spline
transform driven by Mattes mutual information and return a dense displacement
``(2, H, W)`` float32 in the convention of :mod:`napari_discreg.core.registration.warp`::

    warped(r, c) = moving(r + u[0, r, c], c + u[1, r, c])

so ``warp_numpy(moving, u)`` is aligned with ``fixed``, as for the learned model.

Both toolkits see the images as float32 ITK images with spacing 1 and origin 0,
so a physical point ``(x, y)`` is the pixel ``(col, row)``. Their registration
transform ``T`` maps a point of the fixed image to the moving image (the
"backward" mapping, the same as ours), hence ``T(p) - p`` is our displacement
with its two components swapped from ``(x, y)`` to ``(row, col)``.

``itk`` / ``itk-elastix`` and ``SimpleITK`` are optional dependencies (``pip install
"napari-discreg[peers]"``), imported only inside the functions: importing
:mod:`napari_discreg.core` never needs them.

Threads: both functions run with at most ``threads`` (default 2) ITK threads; the
process-wide ITK default is restored afterwards. Known quirks handled here:
``itk.elastix_registration_method(..., number_of_threads=...)`` and
``ElastixRegistrationMethod.SetNumberOfThreads`` crash (segmentation fault) with
itk-elastix 0.25 / ITK 5.4 (and elastix has no thread parameter in its parameter
maps), so elastix gets its thread count from the ITK global default instead; and
SimpleITK's sampling seed ``0`` means "seed from the wall clock", so ``seed`` is
passed to it as ``seed + 1``.

Defaults
--------
Chosen on 10 T1 -> T2 test pairs at 128 px (``fixed_test_pairs(load_template(128),
DataConfig(), n=10, fixed_contrast="t1", moving_contrast="t2", seed=123)``; mean
end-point error over the brain mask, identity 1.76 px):

* elastix: 20 px final grid, 3 levels, 250 iterations, 2048 samples, no affine
  stage: 0.30 px (16 px grid 0.33, 8 px grid 0.49; an affine stage first 0.31),
  about 1-2 s per pair on 2 busy cores. 20 px is the control-point spacing of
  :func:`napari_discreg.core.data.template.random_field` at the default smoothness, so this
  peer is tuned in its favour.
* SimpleITK: mesh 8 (16 px at 128 px), 2 levels, L-BFGS-B 50 iterations, every
  pixel sampled: 0.36 px (30 % random sampling 0.41, 3 levels 0.45, mesh 16 0.75),
  about 2 s per pair.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["PEERS", "elastix_register", "simpleitk_register"]

_INSTALL_HINT = 'install napari-discreg[peers] (pip install "napari-discreg[peers]")'


def _check_pair(fixed, moving) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(fixed, dtype=np.float32)
    m = np.asarray(moving, dtype=np.float32)
    if f.ndim != 2 or m.ndim != 2:
        raise ValueError(f"fixed and moving must be 2D images, got {f.shape} and {m.shape}")
    if f.shape != m.shape:
        raise ValueError(f"fixed {f.shape} and moving {m.shape} must have the same shape")
    if min(f.shape) < 8:
        raise ValueError(f"images must be at least 8 x 8 pixels, got {f.shape}")
    if not (np.isfinite(f).all() and np.isfinite(m).all()):
        raise ValueError("fixed and moving must contain only finite values")
    return np.ascontiguousarray(f), np.ascontiguousarray(m)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value >= 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _xy_to_rowcol(field_hw2: np.ndarray) -> np.ndarray:
    """``(H, W, 2)`` physical ``(x, y)`` displacement -> ``(2, H, W)`` ``(row, col)`` float32."""
    arr = np.asarray(field_hw2)
    return np.ascontiguousarray(np.stack([arr[..., 1], arr[..., 0]]), dtype=np.float32)


# --------------------------------------------------------------------------- elastix


def _import_itk_elastix():
    try:
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018 - lazy attribute: loads the elastix module
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"elastix_register needs itk-elastix: {_INSTALL_HINT}") from exc
    return itk


@contextlib.contextmanager
def _itk_threads(itk, threads: int) -> Iterator[None]:
    threader = itk.MultiThreaderBase
    previous = threader.GetGlobalDefaultNumberOfThreads()
    threader.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield
    finally:
        threader.SetGlobalDefaultNumberOfThreads(previous)


def _elastix_map(parameters, kind: str, resolutions: int, **settings) -> object:
    pmap = parameters.GetDefaultParameterMap(kind, resolutions)
    for key, value in settings.items():
        pmap[key] = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    return pmap


def elastix_register(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    grid_spacing: float = 20,
    resolutions: int = 3,
    iterations: int = 250,
    metric: str = "AdvancedMattesMutualInformation",
    affine: bool = False,
    samples: int = 2048,
    bins: int = 32,
    seed: int = 0,
    threads: int = 2,
) -> np.ndarray:
    """Register ``moving`` to ``fixed`` with elastix (B-spline, mutual information).

    elastix's default 2D B-spline parameter map with: ``resolutions`` levels of a
    Gaussian image pyramid (its default smoothing schedule) and of control-point
    grids refined down to ``grid_spacing`` pixels, the adaptive stochastic gradient
    descent optimiser for ``iterations`` iterations per level, ``samples`` random
    samples per iteration (``RandomCoordinate`` sampler, new every iteration) and
    ``metric`` with ``bins`` histogram bins. With ``affine=True`` an affine
    stage (same levels, iterations and metric) runs first and the B-spline refines it.

    Parameters
    ----------
    fixed, moving : numpy.ndarray
        2D images of the same shape (any intensity range; MI does not need them matched).
    grid_spacing : float
        Final B-spline control-point spacing in pixels.
    resolutions : int
        Number of pyramid levels.
    iterations : int
        Optimiser iterations per level (and per stage).
    metric : str
        An elastix metric, e.g. ``"AdvancedMattesMutualInformation"`` (default),
        ``"AdvancedNormalizedCorrelation"`` or ``"AdvancedMeanSquares"``.
    affine : bool
        Run an affine stage before the B-spline.
    samples : int
        Spatial samples per iteration.
    bins : int
        Histogram bins of the mutual-information metrics.
    seed : int
        elastix ``RandomSeed`` of the sampler: the same seed gives the same field
        (bit-identical, also across processes, in our tests).
    threads : int
        Number of ITK threads (the process-wide ITK default during the call).

    Returns
    -------
    numpy.ndarray
        ``(2, H, W)`` float32 displacement in pixels (row, col),
        ``warp_numpy(moving, u)`` is aligned with ``fixed``.
    """
    f, m = _check_pair(fixed, moving)
    _check_positive(
        grid_spacing=grid_spacing,
        resolutions=resolutions,
        iterations=iterations,
        samples=samples,
        threads=threads,
    )
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    itk = _import_itk_elastix()
    with _itk_threads(itk, threads):
        f_img = itk.image_from_array(f)
        m_img = itk.image_from_array(m)
        for img in (f_img, m_img):
            img.SetSpacing((1.0, 1.0))
            img.SetOrigin((0.0, 0.0))
        common = {
            "Metric": metric,
            "NumberOfHistogramBins": int(bins),
            "MaximumNumberOfIterations": int(iterations),
            "NumberOfSpatialSamples": int(samples),
            "RandomSeed": int(seed),
            "WriteResultImage": "false",
        }
        parameters = itk.ParameterObject.New()
        if affine:
            parameters.AddParameterMap(_elastix_map(parameters, "affine", resolutions, **common))
        parameters.AddParameterMap(
            _elastix_map(
                parameters,
                "bspline",
                resolutions,
                FinalGridSpacingInPhysicalUnits=float(grid_spacing),
                **common,
            )
        )
        registration = itk.ElastixRegistrationMethod.New(f_img, m_img)
        registration.SetParameterObject(parameters)
        registration.SetLogToConsole(False)
        registration.UpdateLargestPossibleRegion()
        transform = registration.GetTransformParameterObject()
        # transformix also writes deformationField.nii to its output directory (the
        # current one by default): keep that in a throw-away folder
        with tempfile.TemporaryDirectory(prefix="napari-discreg-transformix-") as tmp:
            field = itk.transformix_deformation_field(
                m_img, transform, output_directory=tmp, log_to_console=False
            )
            return _xy_to_rowcol(itk.array_from_image(field))


# --------------------------------------------------------------------------- SimpleITK


def _import_simpleitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise ImportError(f"simpleitk_register needs SimpleITK: {_INSTALL_HINT}") from exc
    return sitk


def simpleitk_register(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    mesh_size: int = 8,
    resolutions: int = 2,
    iterations: int = 50,
    bins: int = 32,
    sampling: float = 1.0,
    seed: int = 0,
    threads: int = 2,
) -> np.ndarray:
    """Register ``moving`` to ``fixed`` with SimpleITK (B-spline, Mattes mutual information).

    ``sitk.ImageRegistrationMethod`` with a cubic B-spline transform of
    ``mesh_size`` x ``mesh_size`` intervals from ``BSplineTransformInitializer``,
    Mattes MI with ``bins`` bins on a random ``sampling`` fraction of the pixels
    (all pixels when ``sampling == 1``, the default: more accurate than 30 % at
    about 1.5 times the time), linear interpolation, the L-BFGS-B
    optimiser (``iterations`` per level) and an image pyramid of ``resolutions``
    levels (shrink factors ``2**(L-1), ..., 2, 1``, Gaussian smoothing sigmas of
    half the shrink factor, none at full resolution). The mesh stays the same on
    every level: ITK's L-BFGS-B cannot follow a B-spline mesh refinement.

    Parameters
    ----------
    fixed, moving : numpy.ndarray
        2D images of the same shape.
    mesh_size : int
        B-spline mesh intervals per axis (control-point spacing ``size / mesh_size``
        pixels: 16 px for 128 px images).
    resolutions : int
        Number of pyramid levels.
    iterations : int
        Optimiser iterations per level.
    bins : int
        Mattes MI histogram bins.
    sampling : float
        Fraction of pixels sampled for the metric, in ``(0, 1]``: random (drawn once
        per level) below 1, every pixel at 1.
    seed : int
        Seed of the random sampling (non-negative; unused when ``sampling == 1``).
        The result is bit-identical for the same seed with ``threads=1``; with more
        threads the order of the multi-threaded sums can change the last bits.
    threads : int
        Number of ITK threads.

    Returns
    -------
    numpy.ndarray
        ``(2, H, W)`` float32 displacement in pixels (row, col),
        ``warp_numpy(moving, u)`` is aligned with ``fixed``.
    """
    f, m = _check_pair(fixed, moving)
    _check_positive(
        mesh_size=mesh_size, resolutions=resolutions, iterations=iterations, threads=threads
    )
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if not 0.0 < sampling <= 1.0:
        raise ValueError(f"sampling must be in (0, 1], got {sampling}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    sitk = _import_simpleitk()
    f_img = sitk.GetImageFromArray(f)
    m_img = sitk.GetImageFromArray(m)
    for img in (f_img, m_img):
        img.SetSpacing((1.0, 1.0))
        img.SetOrigin((0.0, 0.0))

    shrink = [2 ** (int(resolutions) - 1 - i) for i in range(int(resolutions))]
    transform = sitk.BSplineTransformInitializer(f_img, [int(mesh_size)] * 2, 3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(int(threads))
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    if sampling < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(float(sampling), int(seed) + 1)  # 0 = wall clock
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=int(iterations),
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=4 * int(iterations),
        costFunctionConvergenceFactor=1e7,
    )
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([s / 2.0 if s > 1 else 0.0 for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)

    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        result = reg.Execute(f_img, m_img)
        field = sitk.TransformToDisplacementField(
            result,
            sitk.sitkVectorFloat64,
            f_img.GetSize(),
            f_img.GetOrigin(),
            f_img.GetSpacing(),
            f_img.GetDirection(),
        )
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    return _xy_to_rowcol(sitk.GetArrayFromImage(field))


PEERS: dict[str, Callable[..., np.ndarray]] = {
    "elastix": elastix_register,
    "simpleitk": simpleitk_register,
}
"""Peer name -> ``f(fixed, moving, **options) -> (2, H, W)`` displacement."""
