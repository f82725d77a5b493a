"""Registration as a run, for the command line and the widget alike: a spec (a pair or two
stacks, the slices, the model, the stages, the device and the memory limit) in, one record
per registered slice out, and a :class:`StackResult` at the end.

::

    run = run_registration(RegistrationSpec(fixed, moving))
    for record in run:              # one SliceRegistered per slice
        print(record.number, record.total, record.result.quality)
    stack = run.result              # or run.close() to stop after the slice in progress

Every slice goes through :func:`napari_discreg.core.registration.register.register`, the one function
behind ``register()``, ``napari-discreg register`` and the widget's Register. Progress
within a slice (every pre-alignment and optimiser step) goes to ``spec.on_step``; an
exception it raises (a stop request) ends the run and propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.config import BSplineConfig, RefineConfig
from ..core.learning.distributed import DistContext
from ..core.learning.model import DiscreteRegistrationNet
from ..core.registration.prealign import DEFAULT_PREALIGN
from ..core.registration.register import RegistrationResult, method_summary, register
from ..core.registration.warp import jacobian_determinant
from ..core.threads import threads_for_load, use_threads_for_load
from .base import Run

SliceIndex = int | None
"""A slice along ``RegistrationSpec.axis``, or ``None`` for a 2D pair."""


@dataclass(frozen=True)
class RegistrationSpec:
    """What one registration run does.

    Attributes
    ----------
    fixed, moving : array_like
        Two 2D images (grayscale or RGB, any sizes), or, with ``axis``, two stacks whose
        slices along ``axis`` are registered one to one.
    axis : int, optional
        The slice axis of the stacks; ``None`` for a 2D pair.
    indices : tuple of int, optional
        The slices to register (default: all of them).
    model : DiscreteRegistrationNet, optional
        Default: the shipped model.
    method, refine, prealign, fixed_spacing, moving_spacing, device, max_memory_gb
        As :func:`~napari_discreg.core.registration.register.register`.
    histograms : bool
        Compute each slice's network histograms in the run (the widget's inspector
        reads them; a GUI must not compute them on its own thread).
    threads : str or int, optional
        torch's thread count for the run, set in the thread that runs it: ``"auto"``
        (the cores other work leaves free now), ``"torch"`` or a number; default
        ``$NAPARI_DISCREG_THREADS``, else ``"auto"``
        (:func:`~napari_discreg.core.threads.use_threads_for_load`).
    on_step : callable, optional
        ``on_step(slice_number, done, total)`` after every optimiser step of a slice
        (``slice_number`` counts from 0).
    """

    fixed: Any
    moving: Any
    axis: int | None = None
    indices: tuple[int, ...] | None = None
    model: DiscreteRegistrationNet | None = None
    method: str | None = None
    refine: bool | int | RefineConfig | BSplineConfig | None = None
    prealign: str = DEFAULT_PREALIGN
    fixed_spacing: tuple[float, float] | None = None
    moving_spacing: tuple[float, float] | None = None
    device: Any = None
    max_memory_gb: float | None = None
    histograms: bool = False
    threads: str | int | None = None
    on_step: Callable[[int, int, int], None] | None = field(default=None, compare=False)

    def slices(self) -> list[SliceIndex]:
        """The slices this spec registers (``[None]`` for a 2D pair)."""
        if self.axis is None:
            if self.indices not in (None, (), (None,)):
                raise ValueError("slices are chosen along an axis: give axis with indices")
            return [None]
        # shapes only: a napari layer's data may be a lazy (dask, zarr) array
        fshape, mshape = tuple(np.shape(self.fixed)), tuple(np.shape(self.moving))
        axis = int(self.axis)
        if not -len(fshape) <= axis < len(fshape) or not -len(mshape) <= axis < len(mshape):
            raise ValueError(
                f"axis {axis} does not exist in stacks of {len(fshape)} and {len(mshape)} "
                "dimensions"
            )
        n, nm = fshape[axis], mshape[axis]
        if n != nm:
            raise ValueError(
                f"the fixed stack has {n} slices along axis {axis} and the moving one {nm}: "
                "slice i is registered to slice i, so they need as many"
            )
        numbers = list(range(n)) if self.indices is None else [int(i) for i in self.indices]
        for i in numbers:
            if not 0 <= i < n:
                raise ValueError(
                    f"slice {i} is out of range: the stacks have {n} slices (0 to {n - 1})"
                )
        chosen: list[SliceIndex] = list(numbers)
        return chosen

    def pair(self, index: SliceIndex) -> tuple[np.ndarray, np.ndarray]:
        """The fixed and moving images of one slice."""
        if index is None:
            return np.asarray(self.fixed), np.asarray(self.moving)
        return (
            np.asarray(np.take(self.fixed, index, axis=self.axis)),
            np.asarray(np.take(self.moving, index, axis=self.axis)),
        )


@dataclass(frozen=True)
class SliceRegistered:
    """The record of one registered slice: ``number`` of ``total`` (counting from 1)."""

    index: SliceIndex
    number: int
    total: int
    result: RegistrationResult


@dataclass
class StackResult:
    """The results of a run, per slice, and what they say together."""

    results: dict[SliceIndex, RegistrationResult]
    axis: int | None = None

    @property
    def first(self) -> RegistrationResult:
        return next(iter(self.results.values()))

    def summary(self) -> dict[str, Any]:
        """Plain numbers for a report (JSON-ready)."""
        rs = list(self.results.values())
        mags = [np.hypot(*r.displacement.astype(np.float64)) for r in rs]
        return {
            "slices": len(rs),
            "method": self.first.method if rs else None,
            "method_summary": method_summary(self.first) if rs else None,
            "prealign": self.first.prealign if rs else None,
            "identity_fallbacks": int(sum(r.identity_fallback for r in rs)),
            "capture_warnings": int(sum(r.capture_warning is not None for r in rs)),
            "warned_slices": int(sum(bool(r.warnings) for r in rs)),
            "displacement_px": {
                "mean_abs": float(np.mean([m.mean() for m in mags])) if rs else 0.0,
                "max_abs": float(max(m.max() for m in mags)) if rs else 0.0,
            },
            "folding": float(
                np.mean([(jacobian_determinant(r.displacement) <= 0).mean() for r in rs])
            )
            if rs
            else 0.0,
        }


Record = SliceRegistered


def _body(spec: RegistrationSpec, slices: list[SliceIndex]) -> Generator[Record, None, StackResult]:
    results: dict[SliceIndex, RegistrationResult] = {}
    use_threads_for_load(spec.threads)
    try:
        for number, index in enumerate(slices):
            fixed, moving = spec.pair(index)

            def progress(done: int, total: int, number: int = number) -> None:
                if spec.on_step is not None:
                    spec.on_step(number, done, total)

            result = register(
                fixed,
                moving,
                model=spec.model,
                device=spec.device,
                method=spec.method,
                refine=spec.refine,
                prealign=spec.prealign,
                fixed_spacing=spec.fixed_spacing,
                moving_spacing=spec.moving_spacing,
                progress=progress,
                max_memory_gb=spec.max_memory_gb,
            )
            if spec.histograms:
                result.network_outputs()
            results[index] = result
            yield SliceRegistered(index, number + 1, len(slices), result)
    except GeneratorExit:
        pass  # closed: the slices registered so far are the result
    return StackResult(results, spec.axis)


def run_registration(spec: RegistrationSpec) -> Run[Record, StackResult]:
    """Start ``spec``: a :class:`~napari_discreg.runs.base.Run` of one
    :class:`SliceRegistered` per slice that returns a :class:`StackResult`. Invalid slices
    raise ``ValueError`` here, before anything runs."""
    slices = spec.slices()
    threads_for_load(spec.threads)  # a bad setting is refused here, before anything runs
    return Run(
        _body(spec, slices),
        start_step=0,
        total=len(slices),
        spec=spec,
        context=DistContext(),
    )


def register_pair(spec: RegistrationSpec) -> RegistrationResult:
    """Run a 2D pair's spec to its end and return its one result."""
    run = run_registration(spec)
    for _ in run:
        pass
    if run.result is None or not run.result.results:  # pragma: no cover - a pair always runs
        raise RuntimeError("the registration ended without a result")
    return run.result.first
