"""A hung rank under torchrun (issue 17): with a collective timeout of a few seconds,
the rank that waits for a stopped one fails with a clear error instead of blocking
for torch's default 30 minutes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from napari_discreg.cli import build_parser
from napari_discreg.core.learning import distributed as dist_mod

WORKER = r"""
import os, sys, time
from pathlib import Path
from napari_discreg.core.learning.distributed import (
    all_reduce_mean, barrier, collective_failure, init_distributed, shutdown,
)
ctx = init_distributed("cpu")  # timeout from NAPARI_DISCREG_DIST_TIMEOUT
barrier(ctx)
Path(sys.argv[1], f"ready{ctx.rank}").write_text("")
if ctx.rank == 1:
    time.sleep(60)  # stopped by the test before it gets here again
time.sleep(1.0)
start = time.monotonic()
try:
    all_reduce_mean({"x": 1.0}, ctx)
except RuntimeError as exc:
    err = collective_failure(exc, ctx)
    print(f"{type(err).__name__} after {time.monotonic() - start:.1f} s: {err}", flush=True)
    os._exit(3)  # as the CLI does: a group with a hung peer cannot be torn down
print("no error", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
def test_a_stopped_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        NAPARI_DISCREG_DIST_TIMEOUT="3",
        OMP_NUM_THREADS="1",
    )
    procs = []
    try:
        for rank in (0, 1):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, str(tmp_path)],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready1").exists():
            assert time.monotonic() < deadline, "the ranks did not start"
            assert procs[1].poll() is None, procs[1].communicate()[0]
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGSTOP)
        start = time.monotonic()
        out, _ = procs[0].communicate(timeout=30)
        elapsed = time.monotonic() - start
        assert procs[0].returncode == 3, out
        assert "DistributedError" in out and "collective timeout (3 s)" in out, out
        assert elapsed < 20, elapsed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL works on a stopped process
            p.wait(10)


def test_timeout_defaults_to_minutes_and_is_settable(monkeypatch):
    monkeypatch.delenv(dist_mod.TIMEOUT_ENV, raising=False)
    assert 60 <= dist_mod.collective_timeout() <= 600
    assert dist_mod.init_distributed("cpu").timeout_s == dist_mod.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(dist_mod.TIMEOUT_ENV, "12.5")
    assert dist_mod.collective_timeout() == 12.5
    assert dist_mod.collective_timeout(4) == 4.0
    monkeypatch.setenv(dist_mod.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="NAPARI_DISCREG_DIST_TIMEOUT"):
        dist_mod.collective_timeout()


@pytest.mark.parametrize("command", ["train", "adapt"])
def test_cli_passes_dist_timeout(command, monkeypatch, tmp_path):
    args = build_parser().parse_args(
        [command, "-o", str(tmp_path / "m.safetensors"), "--dist-timeout", "7"]
    )
    assert args.dist_timeout == 7.0
    args.command_line = command
    seen = {}

    def fake_init(device=None, *, timeout_s=None, **kw):
        seen["timeout_s"] = timeout_s
        raise KeyboardInterrupt  # stop before any work

    import importlib

    module = importlib.import_module(f"napari_discreg.cli.{command}")
    monkeypatch.setattr(module, "init_distributed", fake_init)
    if command == "adapt":
        monkeypatch.setattr(module, "resolve_adaptation", lambda spec: spec)
    with pytest.raises(KeyboardInterrupt):
        args.func(args)
    assert seen["timeout_s"] == 7.0


def test_collective_failure_is_translated_only_in_a_distributed_run():
    ctx = dist_mod.DistContext(rank=0, world_size=2, backend="gloo", timeout_s=3)
    exc = RuntimeError("[gloo/transport/tcp/pair.cc:534] Timed out waiting 3000ms for recv")
    err = dist_mod.collective_failure(exc, ctx)
    assert isinstance(err, dist_mod.DistributedError) and "3 s" in str(err)
    other = RuntimeError("shape mismatch")
    assert dist_mod.collective_failure(other, ctx) is other
    assert dist_mod.collective_failure(exc, dist_mod.DistContext()) is exc
