"""The memory model (core.memory) and the B-spline stage it bounds (issue 26 items 9, 11, 12):
very wide or tall images, custom B-spline settings, the banded solve on every device, and
the limits of the process (RLIMIT_AS, cgroups) and of a CUDA device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from napari_discreg.core import memory
from napari_discreg.core.config import BSplineConfig, ModelConfig
from napari_discreg.core.registration import bspline

CFG = ModelConfig()


def _run(code: str, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# item 9: extreme aspect ratios


def test_the_band_spans_the_shorter_side_of_the_control_grid():
    # 16 x 65536 px at spacing 12: 5 x 5465 control points. Ordered along rows the band
    # spanned 6 x 5465 points (14 GB); along the longer side it spans 6 x 5
    ny, nx = bspline.control_grid_size(16, 12.0), bspline.control_grid_size(65536, 12.0)
    assert bspline.band_rows(ny, nx) == bspline.band_rows(nx, ny) == 6 * 5 + 8
    band = memory.bspline_band_bytes((16, 65536))
    assert band == ny * nx * (16 * 38 + memory._BSPLINE_PER_CP)
    assert band < 120e6  # the band itself: 16 MB
    # the transposed image: the same grid, the same band
    assert memory.bspline_band_bytes((65536, 16)) == band


def test_a_wide_image_registers_with_a_small_band_and_no_dense_basis(monkeypatch):
    # before: dense (pixels x control points) bases and a band along the long side: 16 x
    # 16384 px took 3 GB and 54 s (a band of 8216 x 13680 values); now 0.15 GB and 1 s
    import scipy.linalg

    bands = []
    solve = scipy.linalg.solveh_banded

    def recording(ab, b, **kwargs):
        bands.append(ab.shape)
        assert ab.shape[0] <= 38, f"a band of {ab.shape} for a 5-point-high grid"
        return solve(ab, b, **kwargs)

    def dense(*args, **kwargs):
        raise AssertionError("a dense (pixels x control points) basis")

    monkeypatch.setattr(scipy.linalg, "solveh_banded", recording)
    monkeypatch.setattr(bspline, "bspline_basis", dense)
    rng = np.random.default_rng(0)
    f = gaussian_filter(rng.random((16, 8192)), 3).astype(np.float32)
    ft = torch.from_numpy(f)[None, None]
    mt = torch.from_numpy(np.roll(f, 2, axis=1))[None, None]
    field = bspline.bspline_refine(ft, mt)[0].numpy()
    assert abs(float(np.median(field[1])) - 2.0) < 0.2
    nx = bspline.control_grid_size(8192, 12.0)
    assert (38, 2 * 5 * nx) in bands


def test_the_estimate_of_very_long_images_covers_their_band_and_pixels():
    for shape in ((16, 65536), (65536, 16), (262144, 16)):
        est = memory.register_estimate(CFG, "bspline", shape)
        assert est.bytes >= shape[0] * shape[1] * memory._BSPLINE_PER_PIXEL
        assert est.host_bytes == memory.bspline_band_bytes(shape)
    # measured after the change: 262144 x 16 px peaked at 2.1 GB (it asked for 22.9 GB)
    assert 2.1e9 < memory.register_estimate(CFG, "bspline", (262144, 16)).bytes < 4.2e9


# item 11: custom B-spline settings


def test_the_estimate_follows_the_bspline_settings():
    default = memory.register_estimate(CFG, "bspline", (512, 512)).bytes
    fine = memory.register_estimate(CFG, "bspline", (512, 512), BSplineConfig(spacing=2)).bytes
    # measured: spacing 2 at 512 px peaked at 1.98 GB (its band alone is 1.66 GB)
    assert fine > 1.98e9 > default
    assert (
        memory.register_estimate(CFG, "network+bspline", (512, 512), BSplineConfig(spacing=2)).bytes
        > fine
    )
    # spacing 2 at 1024 px: a band of 13 GB
    assert (
        memory.register_estimate(CFG, "bspline", (1024, 1024), BSplineConfig(spacing=2)).bytes
        > 13e9
    )
    # one level of spacing 12 needs no more than three
    one = memory.register_estimate(
        CFG, "bspline", (512, 512), BSplineConfig(levels=1, iterations=(2,))
    )
    assert one.bytes <= default
    # other methods' settings do not change it
    assert memory.register_estimate(CFG, "network", (512, 512), None).bytes < default


def test_register_refuses_a_fine_bspline_grid_over_the_limit():
    import napari_discreg as nd

    rng = np.random.default_rng(0)
    f = rng.random((512, 512)).astype(np.float32)
    with pytest.raises(ValueError, match=r"bspline.*about 2\.\d GB.*max_memory_gb"):
        nd.register(f, f, method="bspline", refine=BSplineConfig(spacing=2), max_memory_gb=0.5)


# item 12: the solve on every device, the GPU's memory


def _dense_system(hess, weight, damping):
    """The system ``H + weight L + damping I`` written out from its definition."""
    _, _, _, ny, nx = hess.shape
    n = 2 * ny * nx
    big = torch.zeros(n, n, dtype=torch.float64)
    idx = torch.arange(ny * nx).view(ny, nx)
    for blk, (a, b) in enumerate(((0, 0), (0, 1), (1, 1))):
        for kd, di in enumerate(range(-3, 4)):
            for ke, dj in enumerate(range(-3, 4)):
                for i in range(max(0, -di), min(ny, ny - di)):
                    for j in range(max(0, -dj), min(nx, nx - dj)):
                        p, q = 2 * idx[i, j] + a, 2 * idx[i + di, j + dj] + b
                        big[p, q] = big[q, p] = hess[blk, kd, ke, i, j]
    for i in range(ny):
        for j in range(nx):
            for di, dj in ((1, 0), (0, 1)):
                if i + di < ny and j + dj < nx:
                    u, v = idx[i, j], idx[i + di, j + dj]
                    for a in (0, 1):
                        big[2 * u + a, 2 * u + a] += weight
                        big[2 * v + a, 2 * v + a] += weight
                        big[2 * u + a, 2 * v + a] -= weight
                        big[2 * v + a, 2 * u + a] -= weight
    return big + damping * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(4, 11), (11, 4), (6, 6), (4, 4)])
def test_the_banded_solve_matches_the_dense_system(shape):
    ny, nx = shape
    gen = torch.Generator().manual_seed(1)
    hl, wl = 8 * ny, 8 * nx
    by, bx = bspline._basis(hl, 8.0, ny), bspline._basis(wl, 8.0, nx)
    gr = torch.randn(hl, wl, generator=gen, dtype=torch.float64)
    gc = torch.randn(hl, wl, generator=gen, dtype=torch.float64)
    curv = torch.stack([gr * gr, gr * gc, gc * gc])
    hess = bx.reduce_pairs(by.reduce_pairs(curv, 1).transpose(0, 1), 3).permute(1, 2, 0, 3, 4)
    g = torch.randn(2, ny, nx, generator=gen, dtype=torch.float64)
    step = bspline._solve(hess, g, 0.3, 1e-2, ny, nx).double()
    dense = torch.linalg.solve(_dense_system(hess, 0.3, 1e-2), -g.permute(1, 2, 0).reshape(-1))
    want = dense.view(ny, nx, 2).permute(2, 0, 1)
    torch.testing.assert_close(step, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


def test_the_solve_builds_no_dense_matrix(monkeypatch):
    # the dense Cholesky of other devices (29 GB per copy at 2048 px) is gone: every
    # device solves the band on the host
    def refuse(*args, **kwargs):
        raise AssertionError("a dense factorisation")

    monkeypatch.setattr(torch.linalg, "cholesky", refuse)
    monkeypatch.setattr(torch, "cholesky_solve", refuse)
    ny, nx = 3, 40
    hess = torch.zeros(3, 7, 7, ny, nx)
    hess[0, 3, 3] = hess[2, 3, 3] = 1.0
    step = bspline._solve(hess, torch.ones(2, ny, nx), 0.0, 0.0, ny, nx)
    torch.testing.assert_close(step, -torch.ones(2, ny, nx))


def _fake_cuda(monkeypatch, free: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (free, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 300_000_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 100_000_000)


def test_a_cuda_job_is_compared_with_the_gpus_free_memory(monkeypatch):
    _fake_cuda(monkeypatch, 10**9)
    assert memory.gpu_free_bytes("cuda:0") == 1_200_000_000  # free + cached unused
    assert memory.gpu_free_bytes("cpu") is None
    job = memory.MemoryEstimate(2 * 10**9, "a job")
    memory.check_memory(job, limit_gb=3)  # on the CPU: the host limit alone
    with pytest.raises(ValueError, match=r"2\.0 GB of GPU memory, more than the 1\.2 GB free"):
        memory.check_memory(job, limit_gb=3, device=torch.device("cuda", 0))
    # the band stays on the host
    split = memory.MemoryEstimate(2 * 10**9, "a job", host_bytes=10**9)
    memory.check_memory(split, limit_gb=3, device="cuda")


# the limits of the process


def test_memory_limit_takes_rlimit_as():
    out = _run(
        """
        import json, resource
        from napari_discreg.core import memory
        with open("/proc/self/status") as fh:
            vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 500_000_000, resource.RLIM_INFINITY))
        limit, source = memory.memory_limit(100.0)
        try:
            memory.check_memory(memory.MemoryEstimate(10**9, "a job"), limit_gb=100.0)
            refused = ""
        except ValueError as err:
            refused = str(err)
        print(json.dumps({"limit": limit, "source": source, "refused": refused}))
        """
    )
    assert 400_000_000 < out["limit"] <= 500_000_000, out
    assert "RLIMIT_AS" in out["source"] and "RLIMIT_AS" in out["refused"], out


@pytest.mark.parametrize("version", [1, 2])
def test_memory_limit_takes_the_cgroup_limit(tmp_path, monkeypatch, version):
    proc = tmp_path / "cgroup"
    if version == 2:
        proc.write_text("0::/job/step\n")
        (tmp_path / "job" / "step").mkdir(parents=True)
        (tmp_path / "job" / "step" / "memory.max").write_text("max\n")
        (tmp_path / "job" / "memory.max").write_text("3000000000\n")
        (tmp_path / "job" / "memory.current").write_text("1500000000\n")
        (tmp_path / "job" / "memory.stat").write_text("anon 1\ninactive_file 500000000\n")
    else:
        proc.write_text("4:memory:/job\n3:cpuset:/\n")
        (tmp_path / "memory" / "job").mkdir(parents=True)
        (tmp_path / "memory" / "job" / "memory.limit_in_bytes").write_text("3000000000\n")
        (tmp_path / "memory" / "job" / "memory.usage_in_bytes").write_text("1500000000\n")
        (tmp_path / "memory" / "job" / "memory.stat").write_text("total_inactive_file 500000000\n")
        (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    monkeypatch.setattr(memory, "_PROC_CGROUP", str(proc))
    monkeypatch.setattr(memory, "_CGROUP_MOUNT", str(tmp_path))
    monkeypatch.setattr(memory, "available_bytes", lambda: 20 * 10**9)
    assert memory.cgroup_bytes() == 2_000_000_000
    assert memory.memory_limit(8.0) == (
        2_000_000_000,
        "the memory left under this process's cgroup limit",
    )
