"""Measure the peak memory of register() and of one adaptation iteration, next to the
estimate of ``napari_discreg.core.memory``, each case in a fresh process.

Peak = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the job minus the resident size
(``/proc/self/statm``) just before it, after a 64 px warm-up (``tracemalloc`` does not see
torch's allocations). Linux only. Prints one line per case:

    OMP_NUM_THREADS=1 python benchmarks/memory_calibration.py [--quick]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

CASES = [  # (job, size px, K, capture range, stride)
    ("bspline", 256, 15, 7.0, 4),
    ("bspline", 512, 15, 7.0, 4),
    ("bspline", 1024, 15, 7.0, 4),
    ("network", 256, 15, 7.0, 4),
    ("network", 512, 15, 7.0, 4),
    ("network", 1024, 15, 7.0, 4),
    ("network", 256, 15, 7.0, 2),
    ("network", 512, 15, 7.0, 2),
    ("network", 256, 31, 7.0, 4),
    ("network+bspline", 512, 15, 7.0, 4),
    ("adapt", 256, 15, 7.0, 4),
    ("adapt", 384, 15, 7.0, 4),
]


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(job: str, n: int, k: int, q: float, s: int) -> dict:
    import numpy as np
    import torch
    from scipy.ndimage import gaussian_filter

    import napari_discreg as nd
    from napari_discreg.core import data, memory
    from napari_discreg.core.config import AdaptConfig, DataConfig, ModelConfig
    from napari_discreg.core.model import DiscreteRegistrationNet

    torch.set_num_threads(1)
    cfg = ModelConfig(num_labels=k, capture_range=q, stride=s)
    model = nd.load_model(device="cpu") if cfg == ModelConfig() else DiscreteRegistrationNet(cfg)
    model.eval()
    rng = np.random.default_rng(0)
    f = gaussian_filter(rng.random((n, n)), 3).astype(np.float32)
    m = np.roll(f, 2, axis=1)
    small = f[:64, :64].copy()
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
        est = memory.register_estimate(cfg, job, (n, n))
        before, t0 = _rss(), time.perf_counter()
        nd.register(f, m, model=model, method=job, max_memory_gb=1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "job": job,
        "px": n,
        "K": k,
        "stride": s,
        "measured_MB": round((peak - before) / 1e6),
        "estimate_MB": round(est.bytes / 1e6),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        job, n, k, q, s = json.loads(sys.argv[2])
        print(json.dumps(one(job, n, k, q, s)))
        return
    cases = [c for c in CASES if c[1] <= 512] if "--quick" in sys.argv else CASES
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
