"""The benchmark scripts behind docs/benchmarks.md run end to end in their quick modes and
write their sections (into a temporary folder, never docs/)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script():
    loaded = []

    def load(name):
        loaded.append(name)
        return _script(name)

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


def test_transfer_quick(script, tmp_path):
    transfer = script("transfer")
    assert transfer.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "transfer.json").read_text())
    assert "default" in result["models"] and "mono" in result["models"]
    for row in result["results"].values():
        epe = row["epe"]
        assert all(math.isfinite(v) and v >= 0 for v in epe.values())
        for model in result["models"]:
            # the guard never keeps a field that matches worse than no motion, so a
            # fallback gives exactly identity's error
            if row["fallbacks"][model] == row["pairs"]:
                assert epe[f"{model}, register()"] == pytest.approx(epe["identity"], abs=1e-4)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- transfer:start -->" in text and "IHC: hematoxylin vs DAB" in text


def test_short_adaptation_quick(script, tmp_path):
    short = script("short_adaptation")
    assert short.main(["--quick", "--contrasts", "t2", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "short_adaptation.json").read_text())
    run = result["results"]["t2"]["runs"]["mono model, default (self-training)"]
    assert run["seconds"] > 0 and run["curve"][0]["iteration"] == 0
    before = result["results"]["t2"]["rows"]["mono model, before adaptation"]
    # the keep-best rule never returns weights the criterion scores worse than the start;
    # with the start kept, the kept weights evaluate exactly like the model before
    if run["kept_iteration"] == 0:
        assert run["kept"]["label_accuracy"] == pytest.approx(before["label_accuracy"])
    assert (tmp_path / "images" / "short_adaptation.png").is_file()
    assert "<!-- short-adaptation:start -->" in (tmp_path / "benchmarks.md").read_text()


def test_tune_bspline_quick(script, tmp_path):
    pytest.importorskip("itk", reason="itk-elastix is not installed (the peer it compares to)")
    tune = script("tune_bspline")
    assert tune.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- bspline-tuning:start -->" in text and "**(default)**" in text


def test_real_pair_recipes_table_keeps_the_best_criterion(script):
    recipes = script("real_pair_recipes")
    rows = [
        {"step": 0, "criterion": -0.14, "median_tre": 2.0},
        {"step": 10, "criterion": -0.13, "median_tre": 1.5},
        {"step": 25, "criterion": -0.135, "median_tre": 1.0},
    ]
    text = recipes.markdown({"rat-kidney | mind all": {"rows": rows}})
    # keep-best by the criterion keeps step 10 (TRE 1.5: -25 %), not the lowest TRE
    assert "| mind all | rat-kidney | 0: 2.00 (-0.1400), 10: 1.50 (-0.1300), " in text
    assert "| 10, 1.50, -25.0 % | - |" in text
    # the pair check keeps the candidate only where the pipeline matches the pair better
    for r, distance in zip(rows, (0.10, 0.11, 0.09), strict=True):
        r["pipeline_mind"] = distance
    best, checked = recipes.keep_best(rows)
    assert best["step"] == 10 and checked["step"] == 0
    rows[1]["pipeline_mind"] = 0.095
    assert recipes.keep_best(rows)[1]["step"] == 10
    text = recipes.markdown(
        {
            "rat-kidney | mind all": {"rows": rows},
            "spread | rat-kidney": {
                "pipeline": 1.2,
                "variants": [1.1, 1.2, 1.5],
                "mean_field": 1.0,
            },
        }
    )
    assert "1 runs. The worst change of what keep-best keeps: tiles alone -25.0 %" in text
    assert "with the pair check -25.0 % (mind all, rat-kidney)" in text
    assert "| rat-kidney | 1.20 | 1.10 - 1.50 (1.20) | 1.00 |" in text
