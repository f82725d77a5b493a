"""Data-parallel training: 2 CPU processes with gloo, started by torch.distributed.run.

The machine that runs the tests may have 2 cores only, so every run is tiny (48 px,
a 4-feature model, ~20 steps): the tests check correctness (identical replicas,
disjoint data shards, a falling loss), not speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_discreg.core.config import DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files import imagefiles
from napari_discreg.core.files.checkpoint import checkpoint_info
from napari_discreg.core.learning.distributed import (
    DistContext,
    all_reduce_mean,
    average_gradients,
    barrier,
    broadcast_module,
    ddp_source_loss,
    init_distributed,
    max_weight_difference,
    shutdown,
)

SIZE = 48
WORKER = Path(__file__).with_name("_ddp_worker.py")
TINY = ["--num-labels", "5", "--capture-range", "2", "--features", "4", "--head-channels", "8"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """DATA/t1 and DATA/t2: three co-registered 'subjects' (template slabs) per contrast."""
    root = tmp_path_factory.mktemp("scans")
    template = data.load_template(SIZE)
    cfg = DataConfig(size=SIZE)
    for s, lo in enumerate((45, 60, 75)):
        slices = range(lo, lo + 10)
        t1 = np.asarray(template.t1[lo : lo + 10])
        t2 = np.stack(
            [
                data.synthesize_contrast(template, k, "t2", np.random.default_rng(k), cfg)
                for k in slices
            ]
        )
        for name, vol in (("t1", t1), ("t2", t2)):
            (root / name).mkdir(exist_ok=True)
            imagefiles.write_image(root / name / f"sub{s}.nii.gz", vol.transpose(1, 2, 0))
    return root


def _torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_gloo_ranks_train_and_adapt_to_identical_weights(folders, tmp_path):
    _torchrun(WORKER, folders, tmp_path, cwd=tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    for stage in ("train", "adapt"):
        w0, w1 = (load_file(str(tmp_path / f"rank{r}_{stage}.safetensors")) for r in (0, 1))
        assert w0.keys() == w1.keys()
        for key in w0:  # bit-identical replicas, although the ranks started from other weights
            assert torch.equal(w0[key], w1[key]), f"{stage}: {key} differs between ranks"
    # the ranks trained on different data: disjoint shards of the slices, other target pairs
    assert not set(reports[0]["first_items"]) & set(reports[1]["first_items"])
    assert reports[0]["target_first_fixed_sum"] != reports[1]["target_first_fixed_sum"]
    losses = np.array(reports[0]["losses"])
    assert losses.shape == (20,) and np.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean(), losses  # the (all-reduced) loss falls
    assert reports[0]["losses"] == reports[1]["losses"]  # all_reduce_mean agrees on all ranks
    assert len(reports[0]["discrepancies"]) == 3


def test_cli_train_under_torchrun(folders, tmp_path):
    out = tmp_path / "m.safetensors"
    proc = _torchrun(
        "-m",
        "napari_discreg",
        "train",
        "--source",
        folders / "t1",
        "-o",
        out,
        "--steps",
        16,
        "--batch-size",
        2,
        "--lr",
        "0.01",
        "--size",
        SIZE,
        "--device",
        "cpu",
        "--checkpoint-every",
        8,
        "--eval-pairs",
        4,
        *TINY,
        cwd=tmp_path,
    )
    assert proc.stdout.count("saved ") == 1  # rank 0 alone prints and writes
    assert "2 processes ended with identical weights: True" in proc.stdout
    info = checkpoint_info(out)["training"]
    assert info["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "pairs_per_step": 4,
        "max_weight_difference": 0.0,
    }
    curve = np.array(info["loss_curve"])[:, 1]
    assert curve[-4:].mean() < curve[:4].mean(), curve
    assert info["evaluation"]["pairs"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.state.safetensors"]


# ------------------------------------------------------------- single process: no-ops


def test_single_process_helpers_are_no_ops(tiny_model, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext(device=torch.device("cpu")) and ctx.is_main and not ctx.distributed
    assert all_reduce_mean({"loss": 2.0, "acc": float("nan")}, ctx)["loss"] == 2.0
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    broadcast_module(tiny_model, ctx)
    barrier(ctx)
    assert max_weight_difference(tiny_model, ctx) == 0.0
    with average_gradients(tiny_model, ctx):
        pass
    loss_fn = ddp_source_loss(tiny_model, ctx)
    assert not isinstance(loss_fn.module, torch.nn.parallel.DistributedDataParallel)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    shutdown(ctx)


def test_world_size_one_under_torchrun_is_single_process(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not init_distributed("cpu").distributed
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        init_distributed("cpu")
