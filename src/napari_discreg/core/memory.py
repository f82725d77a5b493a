"""How much memory a registration or an adaptation will need, checked before it starts.

The pixel limit (:data:`~napari_discreg.core.preprocess.MAX_PIXELS`) alone does not bound
memory: the network's cost volume and heads hold ``K^2`` values per control point, and
there are ``H * W / stride^2`` control points, so a model with many labels or a small
stride needs gigabytes for a small image. :func:`check_memory` refuses a job whose
estimate exceeds the bound (:func:`memory_limit`) with the number and a hint, before
anything large is allocated.

Calibration
-----------
The coefficients below were fitted to the peak resident memory of single jobs, each in
a fresh process (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the job minus the
resident size from ``/proc/self/statm`` just before it, after a 64 px warm-up; torch's
allocations are invisible to ``tracemalloc``), on CPU with one thread, torch 2.x, x86_64.
Measured (MB of peak growth), with ``cp-labels`` = control points x K^2:

* ``method="network"``, shipped model (K = 15, stride 4): 256 px 38, 512 px 176,
  1024 px 541; K = 15 stride 2: 256 px 170, 512 px 461 -> about 30-48 bytes per
  cp-label plus 30 bytes per pixel; estimated as 64 B/px + 48 B/cp-label.
* K = 31, capture range 7 (non-integer label spacing: the ``grid_sample`` cost volume,
  which holds ``C * K^2`` values per control point): 256 px 807, 512 px 3269 -> about
  8.6 bytes per feature x cp-label; estimated as 9 B.
* ``method="bspline"`` (no network): 256 px 38, 512 px 181, 1024 px 803 -> estimated
  as 800 B/px. ``network+bspline`` 512 px 240, ``network+adam`` 512 px 184: estimated
  as the network's plus the B-spline's.
* One training forward/backward (batch 2): K = 15 stride 4 256 px 217, 512 px 842;
  stride 2 256 px 607 -> 640 B/px + 80 B/cp-label; K = 31 at 128 px 724 -> 12 B per
  feature x cp-label on the ``grid_sample`` path.
* One adaptation iteration (``adapt``, batch 2, source and targets of the same size):
  256 px 583, 384 px 1207, about 2.8x one training step of the same batch; estimated
  as 3x.

The estimates are upper bounds, 1.1-1.7x the measured peak on these cases
(``OMP_NUM_THREADS=1 python benchmarks/memory_calibration.py --quick``: e.g. network
512 px 174 MB measured / 194 estimated, stride 2 483 / 725, K = 31 256 px 883 / 1043,
bspline 512 px 168 / 210, adaptation 384 px 1121 / 1562); rerun that script on a new
machine or torch release to re-check them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ENV_PREFIX, ModelConfig, limit_setting
from .methods import Method, method_named

ENV_LIMIT = ENV_PREFIX + "MAX_MEMORY_GB"
"""Environment variable: the most memory (GB, 1e9 bytes) one job may need by the estimate."""
DEFAULT_LIMIT_GB = 8.0
"""Default of :data:`ENV_LIMIT`; the machine's available memory bounds it too."""

# bytes, fitted as described in the module docstring
_INFER_PER_PIXEL = 64
_INFER_PER_CP_LABEL = 48
_INFER_PER_SAMPLED = 9  # grid_sample cost volume: per feature channel per cp-label
_BSPLINE_PER_PIXEL = 800
_TRAIN_PER_PIXEL = 640
_TRAIN_PER_CP_LABEL = 80
_TRAIN_PER_SAMPLED = 12
_ADAPT_FACTOR = 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job is expected to need at its peak, and what it is."""

    bytes: int
    what: str

    @property
    def gb(self) -> float:
        return self.bytes / 1e9


GUARD_FLOOR = 256_000_000
"""The network's own check (:meth:`~napari_discreg.core.model.DiscreteRegistrationNet.cost_volume`)
skips estimates below this many bytes (it would cost a read of ``/proc/meminfo`` per pass)."""


def _integer_shifts(config: ModelConfig) -> bool:
    """Whether the cost volume is built from integer shifts (as
    :func:`~napari_discreg.core.model.integer_shift_spacing` decides: an even stride and a
    whole-pixel label spacing); else ``grid_sample`` holds ``C * K^2`` values per point."""
    step = 2.0 * config.capture_range / (config.num_labels - 1)
    return config.stride % 2 == 0 and step >= 1 - 1e-6 and abs(step - round(step)) <= 1e-6


def _padded(n: int, stride: int) -> int:
    return -(-int(n) // stride) * stride


def _network_terms(config: ModelConfig, shape: tuple[int, int], batch: int):
    h, w = (_padded(n, config.stride) for n in shape)
    # the per-pixel terms were measured with 24 features (G's activations scale with them)
    pixels = batch * h * w * max(config.features, 24) / 24
    cp_labels = batch * (h // config.stride) * (w // config.stride) * config.num_labels**2
    sampled = 0 if _integer_shifts(config) else cp_labels * config.features
    return pixels, cp_labels, sampled


def network_bytes(config: ModelConfig, shape: tuple[int, int], batch: int = 1) -> int:
    """Peak bytes of one inference pass of a model of ``config`` on ``batch`` pairs of ``shape``."""
    pixels, cpl, sampled = _network_terms(config, shape, batch)
    return int(pixels * _INFER_PER_PIXEL + cpl * _INFER_PER_CP_LABEL + sampled * _INFER_PER_SAMPLED)


def register_estimate(
    config: ModelConfig, method: Method | str, shape: tuple[int, int]
) -> MemoryEstimate:
    """What ``register(method=method)`` of one pair of ``shape`` needs at its peak."""
    m = method_named(method) if isinstance(method, str) else method
    h, w = (int(n) for n in shape)
    total = h * w * _BSPLINE_PER_PIXEL if (m.optimiser or not m.network) else 0
    if m.network:
        total += network_bytes(config, shape)
    return MemoryEstimate(total, f"registering {h} x {w} px with method {m.name!r}")


def training_bytes(config: ModelConfig, shape: tuple[int, int], batch: int) -> int:
    """Peak bytes of one forward and backward pass over ``batch`` pairs of ``shape``."""
    pixels, cpl, sampled = _network_terms(config, shape, batch)
    return int(pixels * _TRAIN_PER_PIXEL + cpl * _TRAIN_PER_CP_LABEL + sampled * _TRAIN_PER_SAMPLED)


def adaptation_estimate(
    config: ModelConfig, shape: tuple[int, int], batch_size: int
) -> MemoryEstimate:
    """What one MCD iteration (steps A, B, C) with batches of ``batch_size`` pairs of
    ``shape`` (the larger of the source and target sizes) needs at its peak."""
    total = _ADAPT_FACTOR * training_bytes(config, shape, batch_size)
    return MemoryEstimate(
        total, f"adapting on {shape[0]} x {shape[1]} px pairs, batches of {batch_size}"
    )


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (psutil's figure where that file is absent);
    ``None`` when neither can tell."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # optional: macOS and Windows have no /proc
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def memory_limit(limit_gb: float | None = None) -> tuple[int, str]:
    """(bytes, where the number comes from): ``limit_gb`` when given, else the environment
    variable :data:`ENV_LIMIT`, else :data:`DEFAULT_LIMIT_GB`; never more than the memory
    the machine has available now."""
    limit_gb, source = limit_setting(limit_gb, ENV_LIMIT, DEFAULT_LIMIT_GB, unit="GB")
    limit = int(limit_gb * 1e9)
    available = available_bytes()
    if available is not None and available < limit:
        return available, "the memory available on this machine now"
    return limit, source


def check_memory(
    estimate: MemoryEstimate, *, limit_gb: float | None = None, hint: str = ""
) -> MemoryEstimate:
    """Raise ``ValueError`` when ``estimate`` exceeds :func:`memory_limit`; else return it."""
    limit, source = memory_limit(limit_gb)
    if estimate.bytes > limit:
        raise ValueError(
            f"{estimate.what} would need about {estimate.gb:.1f} GB of memory, more than "
            f"{limit / 1e9:.1f} GB ({source}); {hint or 'use smaller images'}"
        )
    return estimate
