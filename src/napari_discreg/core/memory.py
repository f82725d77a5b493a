"""How much memory a registration or an adaptation will need, checked before it starts.

The pixel limit (:data:`~napari_discreg.core.registration.preprocess.MAX_PIXELS`) alone does not bound
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

* ``method="network"``, shipped model (K = 15, stride 4): about 30-48 bytes per
  cp-label (control points x K^2) plus 30 bytes per pixel; estimated as 64 B/px +
  48 B/cp-label. K = 31, capture range 7 (the ``grid_sample`` cost volume, ``C * K^2``
  values per control point): about 8.6 bytes per feature x cp-label; estimated as 9 B.
  Every registration adds 16 MB (first-call buffers the warm-up does not cover).
* ``method="bspline"``: a per-pixel term (images, MIND-SSC descriptors, the guard:
  800 B/px, 96 more per MIND-SSC dilation beyond two) plus, on the finest level, the
  band of the normal equations: ``16 (6 n + 8)`` bytes per control point, ``n`` the
  control points along the grid's SHORTER side (the unknowns run along the longer one),
  and 3200 B per control point for the curvature blocks
  (:func:`bspline_band_bytes`). The band grows with the control points times the
  shorter side's: ``BSplineConfig(spacing=2)`` at 512 px is a 1.7 GB band, at 1024 px
  13 GB; a 16 x 65536 px image's band is 16 MB (38 rows).
* ``network+bspline`` and ``network+adam``: the network's plus the second stage's.
* One training forward/backward (batch 2): 640 B/px + 80 B/cp-label; 12 B per feature
  x cp-label on the ``grid_sample`` path. One adaptation iteration (``adapt``, batch 2):
  about 2.8x one training step of the same batch; estimated as 3x.

Measured / estimated MB (``OMP_NUM_THREADS=1 python benchmarks/memory_calibration.py``,
2 shared cores; B-spline spacing 12 unless given):

=====================================  ========  =========
case                                   measured  estimated
=====================================  ========  =========
bspline 256 x 256                            45         72
bspline 512 x 512                           161        242
bspline 1024 x 1024                         737        949
bspline 64 x 4096 / 4096 x 64          193 / 168  239 / 239
bspline 128 x 2048 / 2048 x 128        161 / 172  237 / 237
bspline 16 x 16384                          151        252
bspline 256 x 256, spacing 4                 84        112
bspline 512 x 512, spacing 4                424        499
bspline 256 x 256, spacing 2                309        341
bspline 128 x 2048, spacing 2               763        897
network 256 / 512 / 1024 px            51 / 181 / 652  64 / 210 / 791
network 64 x 4096 / 4096 x 64          156 / 185  210 / 210
network stride 2, 256 / 512 px         160 / 484  197 / 741
network K = 31, 256 px                      823       1059
network+bspline 512 x 512                   247        436
network+bspline 128 x 2048                  237        431
adapt 256 / 384 px (batch 2)           479 / 1000  694 / 1562
=====================================  ========  =========

Before the band followed the shorter side and the bases were kept sparse, the B-spline
stage grew with the longer side squared: 16 x 16384 px took 3.0 GB and 54 s (now
0.15 GB and under 1 s), 262144 x 16 px asked for 22.9 GB at once (now 2.1 GB measured,
estimated 3.8 GB), 16 x 65536 px needed a 14 GB band (now 16 MB; the whole job 0.63 GB,
estimated 0.96 GB), and ``BSplineConfig(spacing=2)`` at 512 px peaked at 4.1 GB against
an estimate of 0.21 GB (now 1.98 GB measured, 2.1 GB estimated).

The estimates are upper bounds, 1.05-1.8x the measured peak on these cases; rerun the
script on a new machine or torch release to re-check them. The bound they are compared
with (:func:`memory_limit`) is the smallest of the setting, the machine's available
memory, the address space left under ``RLIMIT_AS`` and the memory left under the
process's cgroup limit; on a CUDA device the part of the job that lives there is also
compared with the GPU's free memory (:func:`check_memory`).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from .config import ENV_PREFIX, BSplineConfig, ModelConfig, limit_setting
from .registration.methods import Method, Settings, method_named

ENV_LIMIT = ENV_PREFIX + "MAX_MEMORY_GB"
"""Environment variable: the most memory (GB, 1e9 bytes) one job may need by the estimate."""
DEFAULT_LIMIT_GB = 8.0
"""Default of :data:`ENV_LIMIT`; the machine's available memory bounds it too."""

# bytes, fitted as described in the module docstring
_INFER_PER_PIXEL = 64
_INFER_PER_CP_LABEL = 48
_INFER_PER_SAMPLED = 9  # grid_sample cost volume: per feature channel per cp-label
_BSPLINE_PER_PIXEL = 800
_BSPLINE_PER_DILATION = 96  # MIND-SSC blocks beyond the default two dilations, per pixel
_BSPLINE_PER_CP = 3200  # curvature blocks (float32, then float64 on the host), per point
_TRAIN_PER_PIXEL = 640
_TRAIN_PER_CP_LABEL = 80
_TRAIN_PER_SAMPLED = 12
_ADAPT_FACTOR = 3
_REGISTER_BASE = 16_000_000  # first-call buffers of a registration


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job is expected to need at its peak, and what it is."""

    bytes: int
    what: str
    host_bytes: int = 0
    """The part that lives in host memory whatever the device (the B-spline's band)."""

    @property
    def gb(self) -> float:
        return self.bytes / 1e9


GUARD_FLOOR = 256_000_000
"""The network's own check (:meth:`~napari_discreg.core.learning.model.DiscreteRegistrationNet.cost_volume`)
skips estimates below this many bytes (it would cost a read of ``/proc/meminfo`` per pass)."""


def _integer_shifts(config: ModelConfig) -> bool:
    """Whether the cost volume is built from integer shifts (as
    :func:`~napari_discreg.core.learning.model.integer_shift_spacing` decides: an even stride and a
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


def bspline_band_bytes(shape: tuple[int, int], settings: BSplineConfig | None = None) -> int:
    """Bytes of the largest band the B-spline stage factorises for an image of ``shape``:
    ``16 x band_rows x control points`` (float64, both axes) on its finest grid (see
    :func:`~napari_discreg.core.registration.bspline._solve`: the band spans the grid's shorter side)."""
    from .registration.bspline import band_rows, control_grid_size, level_schedule

    cfg = settings or BSplineConfig()
    h, w = (int(n) for n in shape)
    most = 0
    for f, steps in level_schedule((h, w), cfg):
        if steps:
            s = float(cfg.spacing) * f
            ny, nx = control_grid_size(h, s), control_grid_size(w, s)
            most = max(most, ny * nx * (16 * band_rows(ny, nx) + _BSPLINE_PER_CP))
    return most


def bspline_bytes(shape: tuple[int, int], settings: BSplineConfig | None = None) -> int:
    """Peak bytes of the B-spline stage (``register``'s images and guard included) for an
    image of ``shape`` with ``settings``: a per-pixel term and the largest level's band
    and curvature blocks (:func:`bspline_band_bytes`)."""
    cfg = settings or BSplineConfig()
    h, w = (int(n) for n in shape)
    per_pixel = _BSPLINE_PER_PIXEL + _BSPLINE_PER_DILATION * max(0, len(cfg.dilations) - 2)
    return h * w * per_pixel + bspline_band_bytes((h, w), cfg)


def register_estimate(
    config: ModelConfig,
    method: Method | str,
    shape: tuple[int, int],
    settings: Settings = None,
) -> MemoryEstimate:
    """What ``register(method=method)`` of one pair of ``shape`` needs at its peak;
    ``settings``: the method's refinement settings (a :class:`BSplineConfig` changes the
    B-spline stage's grid: its spacing and levels; default: the defaults)."""
    m = method_named(method) if isinstance(method, str) else method
    h, w = (int(n) for n in shape)
    total = host = 0
    if m.optimiser == "bspline":
        cfg = settings if isinstance(settings, BSplineConfig) else None
        total = bspline_bytes((h, w), cfg)
        host = bspline_band_bytes((h, w), cfg)
    elif m.optimiser or not m.network:
        total = h * w * _BSPLINE_PER_PIXEL
    if m.network:
        total += network_bytes(config, shape)
    total += _REGISTER_BASE
    return MemoryEstimate(total, f"registering {h} x {w} px with method {m.name!r}", host)


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


_PROC_CGROUP = "/proc/self/cgroup"
_CGROUP_MOUNT = "/sys/fs/cgroup"  # cgroup v2; v1's memory controller in its memory/


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for none


def _inactive_file(path: str) -> int:
    """Reclaimable page cache a cgroup's usage counts (``memory.stat``)."""
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file"):
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_bytes() -> int | None:
    """Memory left under this process's cgroup limits: ``memory.max - memory.current``
    (cgroup v2) or ``memory.limit_in_bytes - memory.usage_in_bytes`` (v1), reclaimable
    page cache not counted as used, the smallest over the process's cgroup and its
    parents; ``None`` without a limit."""
    try:
        with open(_PROC_CGROUP) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        hid, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and not controllers:
            root, files = _CGROUP_MOUNT, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root = os.path.join(_CGROUP_MOUNT, "memory")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p and p != ".."]
        for k in range(len(parts), -1, -1):  # the cgroup, its parents, the mount's root
            folder = os.path.join(root, *parts[:k])
            limit = _read_int(os.path.join(folder, files[0]))
            if limit is None or limit >= 1 << 60:  # none ("max", or v1's 2^63 - page)
                continue
            used = _read_int(os.path.join(folder, files[1])) or 0
            used -= _inactive_file(os.path.join(folder, "memory.stat"))
            left = max(0, limit - max(used, 0))
            best = left if best is None else min(best, left)
    return best


def address_space_bytes() -> int | None:
    """Address space this process may still map under ``RLIMIT_AS`` (``ulimit -v``): the
    soft limit minus ``VmSize``; ``None`` without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    size = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    size = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return max(0, soft - size)


def memory_limit(limit_gb: float | None = None) -> tuple[int, str]:
    """(bytes, where the number comes from): ``limit_gb`` when given, else the environment
    variable :data:`ENV_LIMIT`, else :data:`DEFAULT_LIMIT_GB`; never more than the memory
    the machine has available now (:func:`available_bytes`), the address space left under
    ``RLIMIT_AS`` (:func:`address_space_bytes`) or the memory left under the process's
    cgroup limit (:func:`cgroup_bytes`): the smallest of these."""
    limit_gb, source = limit_setting(limit_gb, ENV_LIMIT, DEFAULT_LIMIT_GB, unit="GB")
    best = (int(limit_gb * 1e9), source)
    for bound, where in (
        (available_bytes(), "the memory available on this machine now"),
        (
            address_space_bytes(),
            "the address space left under this process's RLIMIT_AS (ulimit -v)",
        ),
        (cgroup_bytes(), "the memory left under this process's cgroup limit"),
    ):
        if bound is not None and bound < best[0]:
            best = (bound, where)
    return best


def gpu_free_bytes(device) -> int | None:
    """Memory a CUDA ``device`` can still give torch (``torch.cuda.mem_get_info``'s free
    memory plus what torch's caching allocator holds unused); ``None`` for another
    device or when it cannot tell."""
    try:
        import torch

        dev = torch.device(device)
        if dev.type != "cuda" or not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    except (RuntimeError, AssertionError, ValueError, TypeError):
        return None
    return int(free) + max(0, int(cached))


def check_memory(
    estimate: MemoryEstimate, *, limit_gb: float | None = None, hint: str = "", device=None
) -> MemoryEstimate:
    """Raise ``ValueError`` when ``estimate`` exceeds :func:`memory_limit`, or, on a CUDA
    ``device``, when its part on the device (all but ``host_bytes``) exceeds the GPU's
    free memory (:func:`gpu_free_bytes`); else return it."""
    limit, source = memory_limit(limit_gb)
    hint = hint or "use smaller images"
    if estimate.bytes > limit:
        raise ValueError(
            f"{estimate.what} would need about {estimate.gb:.1f} GB of memory, more than "
            f"{limit / 1e9:.1f} GB ({source}); {hint}"
        )
    free = gpu_free_bytes(device) if device is not None else None
    on_device = estimate.bytes - estimate.host_bytes
    if free is not None and on_device > free:
        raise ValueError(
            f"{estimate.what} would need about {on_device / 1e9:.1f} GB of GPU memory, more "
            f"than the {free / 1e9:.1f} GB free on {device} now; {hint} (or run on the CPU)"
        )
    return estimate
