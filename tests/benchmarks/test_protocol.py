"""The adaptation benchmark's --quick mode runs the same code path as the full table."""

from __future__ import annotations

import json

import pytest
from _protocol import BenchmarkSettings, format_table, update_section
from adaptation import main, section_name


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("itk")
    pytest.importorskip("SimpleITK")
    out = tmp_path_factory.mktemp("bench")
    assert main(["--quick", "--out-dir", str(out)]) == 0
    return out


def test_quick_benchmark_writes_every_row(quick_run):
    blob = json.loads((quick_run / "benchmarks.json").read_text())["adaptation"]
    rows = blob["rows"]
    expected = {
        "identity",
        "source-only",
        "refine only (from zero)",
        "source-only + refine",
        "MCD-L1",
        "self-training (the default)",
        "MCD-SWD",
        "MCD-pEMD",
        "MCD-pEMD + refine",
        "oracle (target-supervised)",
        "elastix",
        "simpleitk",
    }
    assert set(rows) == expected
    quick = BenchmarkSettings.quick()
    for name, row in rows.items():
        assert len(row["epe"]) == len(quick.seeds), name
        assert all(v >= 0 for v in row["epe"]), name
    assert blob["settings"]["refine_config"]["steps"] == quick.refine.steps
    assert blob["settings"]["self_training_config"]["method"] == "self-training"
    text = (quick_run / "benchmarks.md").read_text()
    assert "<!-- adaptation:start -->" in text and "| MCD-pEMD + refine | 1 |" in text
    assert "python benchmarks/adaptation.py --quick" in text
    assert (quick_run / "images" / "benchmark_adaptation.png").stat().st_size > 0


def test_format_table_shows_mean_and_std_over_seeds():
    table = format_table({"rows": {"r": {"epe": [1.0, 3.0], "label_accuracy": [0.5, 0.5]}}})
    assert "| r | 2 | 50.0 ± 0.0 | 2.00 ± 1.00 |" in table


def test_update_section_replaces_only_its_own_block(tmp_path):
    page = tmp_path / "b.md"
    update_section(page, "a", "first")
    update_section(page, "b", "other")
    update_section(page, "a", "second")
    text = page.read_text()
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("<!-- a:start -->") == 1


@pytest.mark.parametrize("option", ["--n-adapt", "--n-test"])
def test_adaptation_benchmark_refuses_zero_pairs(option, capsys):
    """Before: --n-adapt 0 failed with 'need at least one array to stack' after the
    setup, and --n-test 0 wrote an all-'n/a' table with exit 0."""
    import adaptation

    with pytest.raises(SystemExit) as exit_:
        adaptation.parser().parse_args([option, "0"])
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_each_model_writes_its_own_section():
    assert section_name(None) == ("adaptation", "default")
    assert section_name("default") == ("adaptation", "default")
    assert section_name("mono") == ("adaptation-mono", "mono")
    assert section_name("/runs/x/model.pt") == ("adaptation-model", "model")
