"""benchmarks/paper_protocol.py: the --quick mode writes every row, and the patch-pair
builder's label is the displacement of the moving patch."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_discreg.core.config import DataConfig
from napari_discreg.core.data import template as data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_protocol.py"


@pytest.fixture(scope="module")
def pp():
    spec = importlib.util.spec_from_file_location("paper_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_protocol"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("paper_protocol", None)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # main() pins one thread


def test_quick_run_writes_every_row(pp, tmp_path, keep_threads):
    assert pp.main(["--quick", "--seeds", "0", "1", "--out-dir", str(tmp_path)]) == 0
    blob = json.loads((tmp_path / "paper_protocol.json").read_text())
    assert list(blob["rows"]) == list(pp.ROWS)
    assert set(pp.ROWS) >= set(pp.PAPER)
    for name, row in blob["rows"].items():
        assert len(row["per_seed"]) == 2, name
        for value in (*row["per_seed"], row["mean"], row["std"]):
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (name, value)
        assert row["paper"] == pp.PAPER.get(name)
    assert blob["meta"]["weights_G"] == sum(p.numel() for p in pp.PatchNet().G.parameters())
    md = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- paper-protocol:start -->" in md and "<!-- paper-protocol:end -->" in md
    for name in pp.ROWS:
        assert f"| {name} |" in md
    # a tuning round on the validation split is kept in the json and shown in the section
    assert (
        pp.main(
            [
                "--quick",
                "--tune",
                "--seeds",
                "0",
                "--variants",
                "default",
                "n 2",
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert pp.main(["--markdown-only", "--out-dir", str(tmp_path)]) == 0
    blob = json.loads((tmp_path / "paper_protocol.json").read_text())
    (tuning,) = blob["tuning"]
    assert [r["variant"] for r in tuning["results"]] == ["default", "n 2"]
    for r in tuning["results"]:
        assert set(r["val"]) == {"source-only", "MCD-SWD", "MCD-p-EMD (16+)"}
        assert all(0.0 <= v <= 1.0 for vals in r["val"].values() for v in vals)
    md = (tmp_path / "benchmarks.md").read_text()
    assert "Round 1:" in md and "| n 2 | generator_updates=2 |" in md
    assert md.count("<!-- paper-protocol:start -->") == 1


def _bank(pp, contrasts, noise):
    cfg = DataConfig(size=64, noise=noise, bias=0.0 if noise == 0 else 0.25)
    template = data.load_template(64)
    return pp.build_bank(
        template, (60, 63), contrasts, np.random.default_rng(0), renders=2, warp=0.0, config=cfg
    )


def test_label_is_the_displacement_of_the_moving_patch(pp):
    patch, step = 24, 3
    bank = _bank(pp, ("t1",), noise=0.0)
    # noise-free, bias-free and unwarped: both renderings of a slice are the same image
    np.testing.assert_array_equal(bank.images["t1"][:, 0], bank.images["t1"][:, 1])
    pairs = pp.sample_pairs(
        bank, 200, "t1", "t1", np.random.default_rng(1), patch=patch, step=step, jitter=0
    )
    offsets = pp.class_offsets(step)
    np.testing.assert_array_equal(offsets, [-6, -3, 0, 3, 6])
    assert set(pairs["label"]) == set(range(25))  # every class drawn
    for k in range(200):
        ci, cj = divmod(int(pairs["label"][k]), pp.K)
        dr, dc = int(offsets[ci]), int(offsets[cj])
        np.testing.assert_array_equal(pairs["shift"][k], [dr, dc])
        s = int(np.flatnonzero(bank.slices == pairs["slice"][k])[0])
        image = np.pad(bank.images["t1"][s, 0], patch)  # zero outside, as the crops
        r, c = pairs["centre"][k] + patch - patch // 2  # top-left in the padded image
        fixed = pairs["fixed"][k, 0]
        moving = pairs["moving"][k, 0]
        np.testing.assert_array_equal(fixed, image[r : r + patch, c : c + patch])
        # the moving patch is the fixed crop shifted by the class displacement
        np.testing.assert_array_equal(
            moving, image[r + dr : r + dr + patch, c + dc : c + dc + patch]
        )
        # ... so on the overlap moving[i, j] == fixed[i + dr, j + dc]
        rows = slice(max(0, -dr), patch - max(0, dr))
        cols = slice(max(0, -dc), patch - max(0, dc))
        rows_f = slice(rows.start + dr, rows.stop + dr)
        cols_f = slice(cols.start + dc, cols.stop + dc)
        np.testing.assert_array_equal(moving[rows, cols], fixed[rows_f, cols_f])
        assert pairs["centre"][k] in bank.foreground[s]
        assert bank.masks[s][tuple(pairs["centre"][k])] > 0


def test_jitter_and_contrasts(pp):
    patch, step, jitter = 24, 4, 1
    bank = _bank(pp, ("t1", "t2"), noise=0.03)
    pairs = pp.sample_pairs(
        bank, 100, "t1", "t2", np.random.default_rng(2), patch=patch, step=step, jitter=jitter
    )
    offsets = pp.class_offsets(step)
    ci, cj = np.divmod(pairs["label"], pp.K)
    res = pairs["shift"] - np.stack([offsets[ci], offsets[cj]], 1)
    assert np.abs(res).max() <= jitter and np.abs(res).max() == jitter
    for k in range(100):
        s = int(np.flatnonzero(bank.slices == pairs["slice"][k])[0])
        rf, rm = pairs["render"][k]
        np.testing.assert_array_equal(
            pairs["fixed"][k, 0], pp.crop(bank.images["t1"][s, rf], *pairs["centre"][k], patch)
        )
        np.testing.assert_array_equal(
            pairs["moving"][k, 0],
            pp.crop(bank.images["t2"][s, rm], *(pairs["centre"][k] + pairs["shift"][k]), patch),
        )
    # mono-modal pairs take two different renderings (own bias field and noise)
    mono = pp.sample_pairs(
        bank, 50, "t1", "t1", np.random.default_rng(3), patch=patch, step=step, jitter=jitter
    )
    assert np.all(mono["render"][:, 0] != mono["render"][:, 1])


def test_network_shapes(pp):
    net = pp.PatchNet()
    x = torch.zeros(3, 1, 72, 72)
    feats = net.features(x, x)
    assert feats.shape == (3, 32, 18, 18)
    l1, l2 = net.heads(feats)
    assert l1.shape == l2.shape == (3, 25)
    assert pp.histograms(l1, 0.1).shape == (3, 5, 5)


def test_kind_weights_flag_names_each_discrepancys_own_lambda(pp):
    assert pp.parse_kind_weights(["l1=30", "swd=100"]) == (("l1", 30.0), ("swd", 100.0))
    for bad in (["swd"], ["mse=1"], ["swd=x"], ["swd=-1"]):
        with pytest.raises(SystemExit):
            pp.parse_kind_weights(bad)
    sched = {"discrepancy_weight": 1.0, "kind_weights": [["swd", 100.0]]}
    assert pp._lambda_text(sched) == "1.0 (SWD 100: their own weights, chosen on validation)"
    assert pp._lambda_text({"discrepancy_weight": 1.0, "kind_weights": []}) == "1.0"
