"""Measure the peak memory of register() and of one adaptation iteration, next to the
estimate of ``napari_discreg.core.memory``, each case in a fresh process.

Peak = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the job minus the resident size
(``/proc/self/statm``) just before it, after a 64 px warm-up (``tracemalloc`` does not see
torch's allocations). Linux only. Square and very wide or tall images, and B-spline
spacings down to 2 px (the band of the normal equations). Prints one line per case:

    OMP_NUM_THREADS=1 python benchmarks/memory_calibration.py [--quick]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

CASES = [  # (job, (rows, cols), K, capture range, stride, B-spline spacing)
    ("bspline", (256, 256), 15, 7.0, 4, 12.0),
    ("bspline", (512, 512), 15, 7.0, 4, 12.0),
    ("bspline", (1024, 1024), 15, 7.0, 4, 12.0),
    # extreme aspect ratios: the band spans the shorter side
    ("bspline", (64, 4096), 15, 7.0, 4, 12.0),
    ("bspline", (4096, 64), 15, 7.0, 4, 12.0),
    ("bspline", (128, 2048), 15, 7.0, 4, 12.0),
    ("bspline", (2048, 128), 15, 7.0, 4, 12.0),
    ("bspline", (16, 16384), 15, 7.0, 4, 12.0),
    # finer grids: the band grows with the control points times the shorter side's
    ("bspline", (256, 256), 15, 7.0, 4, 4.0),
    ("bspline", (512, 512), 15, 7.0, 4, 4.0),
    ("bspline", (256, 256), 15, 7.0, 4, 2.0),
    ("bspline", (128, 2048), 15, 7.0, 4, 2.0),
    ("network", (256, 256), 15, 7.0, 4, 12.0),
    ("network", (512, 512), 15, 7.0, 4, 12.0),
    ("network", (1024, 1024), 15, 7.0, 4, 12.0),
    ("network", (64, 4096), 15, 7.0, 4, 12.0),
    ("network", (4096, 64), 15, 7.0, 4, 12.0),
    ("network", (256, 256), 15, 7.0, 2, 12.0),
    ("network", (512, 512), 15, 7.0, 2, 12.0),
    ("network", (256, 256), 31, 7.0, 4, 12.0),
    ("network+bspline", (512, 512), 15, 7.0, 4, 12.0),
    ("network+bspline", (128, 2048), 15, 7.0, 4, 12.0),
    ("adapt", (256, 256), 15, 7.0, 4, 12.0),
    ("adapt", (384, 384), 15, 7.0, 4, 12.0),
]


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(job: str, shape: list[int], k: int, q: float, s: int, spacing: float) -> dict:
    import numpy as np
    import torch
    from scipy.ndimage import gaussian_filter

    import napari_discreg as nd
    from napari_discreg.core import memory
    from napari_discreg.core.config import AdaptConfig, BSplineConfig, DataConfig, ModelConfig
    from napari_discreg.core.data import template as data
    from napari_discreg.core.learning.model import DiscreteRegistrationNet

    torch.set_num_threads(1)
    cfg = ModelConfig(num_labels=k, capture_range=q, stride=s)
    model = nd.load_model(device="cpu") if cfg == ModelConfig() else DiscreteRegistrationNet(cfg)
    model.eval()
    rng = np.random.default_rng(0)
    h, w = shape
    n = max(h, w)
    f = gaussian_filter(rng.random((h, w)), 3).astype(np.float32)
    m = np.roll(f, 2, axis=1)
    small = gaussian_filter(rng.random((64, 64)), 3).astype(np.float32)
    nd.register(small, np.roll(small, 1, 1), model=model, method="network")
    if job == "adapt":
        data.load_template(n)
        est = memory.adaptation_estimate(cfg, (n, n), 2)
        before, t0 = _rss(), time.perf_counter()
        nd.adapt(
            model,
            np.stack([f, f]),
            np.stack([m, m]),
            config=AdaptConfig.mcd(steps=1, batch_size=2, select_every=1),
            data_config=DataConfig(size=n),
        )
    else:
        settings = BSplineConfig(spacing=spacing) if "bspline" in job else None
        est = memory.register_estimate(cfg, job, (h, w), settings)
        before, t0 = _rss(), time.perf_counter()
        nd.register(f, m, model=model, method=job, refine=settings, max_memory_gb=1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "job": job,
        "shape": f"{h}x{w}",
        "K": k,
        "stride": s,
        "spacing": spacing,
        "measured_MB": round((peak - before) / 1e6),
        "estimate_MB": round(est.bytes / 1e6),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(one(*json.loads(sys.argv[2]))))
        return
    quick = "--quick" in sys.argv
    cases = [c for c in CASES if c[1][0] * c[1][1] <= 512 * 512] if quick else CASES
    for case in cases:
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(case)],
            capture_output=True,
            text=True,
            check=True,
        )
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
