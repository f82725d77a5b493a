"""The ``napari-discreg`` command line, driven through ``main([...])``.

A tiny randomly initialised model stands in for the shipped weights, so the tests
check plumbing (files, shapes, exit codes, atomic outputs), not accuracy.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import napari_discreg
import napari_discreg.core.files.checkpoint as checkpoint_mod
import napari_discreg.core.learning.train as train_mod
from napari_discreg import load_model
from napari_discreg.cli import main
from napari_discreg.core.config import AdaptConfig, DataConfig, RefineConfig
from napari_discreg.core.data.template import load_template, make_pair
from napari_discreg.core.files import imagefiles
from napari_discreg.core.files.checkpoint import checkpoint_info
from napari_discreg.core.learning.train import StepRecord
from napari_discreg.core.registration.register import DEFAULT_METHOD

SIZE = 48  # every test uses this template size, so it is built once
TINY = ["--num-labels", "5", "--capture-range", "2", "--features", "4", "--head-channels", "8"]


@pytest.fixture
def tiny_model(tiny_checkpoint) -> Path:
    """The checkpoint of a tiny random model (conftest's ``tiny_checkpoint``)."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    pair = make_pair(
        load_template(SIZE), 110, "t1", "t2", np.random.default_rng(0), DataConfig(size=SIZE)
    )
    folder = tmp_path_factory.mktemp("pair")
    return imagefiles.write_image(folder / "fixed.tif", pair.fixed), imagefiles.write_image(
        folder / "moving.nii.gz", pair.moving
    )


def run(*args) -> int:
    """``main`` with every argument turned into a string."""
    return main([str(a) for a in args])


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("napari-discreg: error: ")
    return err


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------- register


def test_register_writes_all_outputs(tmp_path, tiny_model, pair_files, capsys):
    fixed, moving = pair_files
    out = tmp_path / "a" / "out"
    assert run("register", fixed, moving, "-o", out, "--model", tiny_model) == 0
    assert _tree(out) == [
        "affine.tfm",
        "discrepancy.tif",
        "displacement.npy",
        "summary.json",
        "warped.tif",
    ]
    assert imagefiles.read_image(out / "warped.tif").shape == (SIZE, SIZE)
    u = np.load(out / "displacement.npy")
    assert u.shape == (2, SIZE, SIZE) and u.dtype == np.float32
    assert imagefiles.read_field(out / "displacement.npy").shape == (2, SIZE, SIZE)
    assert imagefiles.read_image(out / "discrepancy.tif").shape == (SIZE // 4, SIZE // 4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shape"] == [SIZE, SIZE]
    assert summary["model"] == str(tiny_model)
    u_mean, u_max = summary["displacement_px"]["mean_abs"], summary["displacement_px"]["max_abs"]
    assert 0 <= u_mean <= u_max < 10  # the pair's deformation is a few pixels
    assert summary["method"] == DEFAULT_METHOD and summary["prealign"] == "affine"
    assert np.asarray(summary["affine_px"]).shape == (3, 3)
    assert set(summary["quality"]) >= {"mind_before", "mind_after", "folding"}
    assert (out / "affine.tfm").read_text().startswith("#Insight Transform File V1.0")
    assert 1.0 <= summary["nmi"]["before"] <= 2.0 and 1.0 <= summary["nmi"]["after"] <= 2.0
    assert summary["runtime_s"] > 0
    assert "NMI" in capsys.readouterr().out


def test_register_methods(tmp_path, tiny_model, pair_files, capsys):
    fixed, moving = pair_files
    base = ["register", fixed, moving, "--model", tiny_model]
    assert run(*base, "-o", tmp_path / "default") == 0
    assert "the network (coarse to fine)" in capsys.readouterr().out
    default = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert default["method"] == "network" and default["refine_steps"] == 0
    assert run(*base, "-o", tmp_path / "spline", "--method", "bspline") == 0
    assert "B-spline Gauss-Newton" in capsys.readouterr().out
    spline = json.loads((tmp_path / "spline" / "summary.json").read_text())
    assert spline["method"] == "bspline" and spline["refine_steps"] > 0
    assert spline["nmi"]["after"] > default["nmi"]["after"]  # the tiny model barely moves
    assert run(*base, "-o", tmp_path / "rigid", "--prealign", "none", "--method", "none") == 0
    still = json.loads((tmp_path / "rigid" / "summary.json").read_text())
    assert still["displacement_px"]["max_abs"] == 0.0  # no pre-alignment, no deformation
    # --refine STEPS keeps its meaning of earlier releases: the network, then Adam
    assert run(*base, "-o", tmp_path / "adam", "--refine", 7) == 0
    assert "Adam (7 Adam steps per level)" in capsys.readouterr().out
    adam = json.loads((tmp_path / "adam" / "summary.json").read_text())
    assert adam["method"] == "network+adam" and adam["refine_steps"] == 7
    assert run(*base, "-o", tmp_path / "adam2", "--method", "network+adam") == 0
    adam2 = json.loads((tmp_path / "adam2" / "summary.json").read_text())
    assert adam2["refine_steps"] == RefineConfig().steps
    assert run(*base, "-o", tmp_path / "bad", "--refine", -2) == 2
    assert run(*base, "-o", tmp_path / "bad", "--method", "bspline", "--refine", 3) == 2
    assert "applies to --method network+adam" in capsys.readouterr().err


def test_register_slices_volumes(tmp_path, tiny_model, pair_files):
    fixed, moving = (imagefiles.read_image(p) for p in pair_files)
    vol_f = imagefiles.write_image(tmp_path / "f.tif", np.stack([fixed * 0, fixed, fixed * 0]))
    vol_m = imagefiles.write_image(tmp_path / "m.npy", np.stack([moving * 0, moving, moving * 0]))
    out = tmp_path / "o"
    assert run("register", vol_f, vol_m, "-o", out, "--model", tiny_model, "--index", 1) == 0
    assert np.load(tmp_path / "o" / "displacement.npy").shape == (2, SIZE, SIZE)


def test_register_missing_input(tmp_path, tiny_model, pair_files, capsys):
    out = tmp_path / "out"
    rc = run("register", pair_files[0], tmp_path / "nope.png", "-o", out, "--model", tiny_model)
    assert rc == 2
    assert "nope.png: no such file" in _error(capsys)
    assert not out.exists()


def test_register_too_small_moving_image(tmp_path, tiny_model, pair_files, capsys):
    """Other sizes are fine (the field lives on the fixed grid); one too small to hold the
    label range is refused, naming the image."""
    small = imagefiles.write_image(tmp_path / "small.npy", np.random.default_rng(0).random((8, 40)))
    out = tmp_path / "out"
    rc = run("register", pair_files[0], small, "-o", out, "--model", tiny_model)
    assert rc == 2
    assert "moving: 8 x 40 pixels is smaller" in _error(capsys)
    assert not out.exists()


def test_register_unwritable_output(tmp_path, tiny_model, pair_files, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    out = blocker / "out"
    rc = run("register", *pair_files, "-o", out, "--model", tiny_model)
    assert rc == 2
    assert "is a file, not a folder" in _error(capsys)
    assert _tree(tmp_path) == ["file.txt"]
    # an existing file as the output folder
    assert run("register", *pair_files, "-o", blocker, "--model", tiny_model) == 2
    assert "is not a folder" in _error(capsys)


def test_register_failure_while_writing_leaves_nothing(
    tmp_path, tiny_model, pair_files, capsys, monkeypatch
):
    def broken(path, field):
        raise OSError("disk full")

    monkeypatch.setattr(imagefiles, "write_field", broken)
    out = tmp_path / "new" / "out"
    rc = run("register", *pair_files, "-o", out, "--model", tiny_model)
    assert rc == 2 and "disk full" in _error(capsys)
    assert _tree(tmp_path) == []  # the folders it created are gone too
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "warped.tif").write_text("old")
    assert run("register", *pair_files, "-o", existing, "--model", tiny_model) == 2
    assert _tree(existing) == ["warped.tif"] and (existing / "warped.tif").read_text() == "old"


def test_register_bad_checkpoint(tmp_path, pair_files, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    out = tmp_path / "out"
    assert run("register", *pair_files, "-o", out, "--model", bad) == 2
    assert "bad.safetensors" in _error(capsys)
    assert not out.exists()


def test_missing_shipped_weights_say_what_to_do(tmp_path, pair_files, capsys, monkeypatch):
    monkeypatch.setattr(
        checkpoint_mod, "default_weights_path", lambda: tmp_path / "none.safetensors"
    )
    assert run("register", *pair_files, "-o", tmp_path / "out") == 2
    assert "--model" in _error(capsys)


# ---------------------------------------------------------------------------- train


def test_train_writes_loadable_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "models" / "m.safetensors"
    assert run("train", "-o", ckpt, "--steps", 2, "--size", SIZE, "--batch-size", 2, *TINY) == 0
    model = load_model(ckpt, "cpu")
    assert model.config.num_labels == 5 and model.config.features == 4
    info = checkpoint_info(ckpt)
    assert info["training"]["steps"] == 2 and info["training"]["completed_steps"] == 2
    assert info["training"]["data_config"]["size"] == SIZE
    assert info["command"].startswith("napari-discreg train -o ")
    assert "saved" in capsys.readouterr().out
    assert _tree(tmp_path) == ["models", "models/m.safetensors"]


def test_train_ctrl_c_saves_what_it_has(tmp_path, capsys, monkeypatch):
    def interrupted(model, *, config, **kwargs):
        yield StepRecord(1, config.steps, {"loss": 1.0, "accuracy": 0.5})
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_steps", interrupted)
    ckpt = tmp_path / "m.safetensors"
    assert run("train", "-o", ckpt, "--steps", 10, *TINY) == 130
    assert checkpoint_info(ckpt)["training"]["interrupted"] is True
    assert checkpoint_info(ckpt)["training"]["completed_steps"] == 1
    assert "interrupted after 1 of 10 steps" in capsys.readouterr().out


def test_train_bad_settings(tmp_path, capsys):
    ckpt = tmp_path / "m.safetensors"
    assert run("train", "-o", ckpt, "--num-labels", 4) == 2
    assert "num_labels" in _error(capsys)
    assert run("train", "-o", ckpt, "--contrasts", "t1,ct") == 2
    assert "--contrasts" in _error(capsys)
    assert run("train", "-o", ckpt, "--steps", 0) == 2  # argparse usage error
    assert "--steps: must be >= 1" in capsys.readouterr().err
    assert run("train", "-o", tmp_path) == 2  # a folder, not a file
    assert "is a folder" in _error(capsys)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- adapt


def test_adapt_demo_target(tmp_path, tiny_model, capsys):
    out = tmp_path / "adapted.safetensors"
    argv = ["adapt", "-o", out, "--model", tiny_model, "--demo-target", 2, "--steps", 2]
    mcd = ["--method", "mcd", "--discrepancy", "pemd"]
    assert run(*argv, "--size", SIZE, "--batch-size", 2, *mcd) == 0
    load_model(out, "cpu")
    meta = checkpoint_info(out)["adaptation"]
    assert meta["discrepancy"] == "pemd" and meta["steps"] == 2 and meta["completed_steps"] == 2
    assert meta["config"]["method"] == "mcd" and meta["config"]["lr"] == AdaptConfig.mcd().lr
    assert meta["best_iteration"] in (0, 1, 2)
    assert meta["best_criterion"] >= meta["initial_criterion"]
    assert meta["selection_criterion"] == "mind"  # AdaptConfig.criterion
    assert meta["target_pairs"] == 2 and meta["base_model"] == str(tiny_model)
    assert "adapted with pemd" in capsys.readouterr().out


def test_adapt_ctrl_c_saves_the_best_weights(tmp_path, tiny_model, capsys, monkeypatch):
    def interrupted(model, fixed, moving, *, config, **kwargs):
        yield StepRecord(0, config.steps, {}, None, 1.10, 0)
        yield StepRecord(1, config.steps, {}, 0.5, 1.20, 1)
        raise KeyboardInterrupt

    monkeypatch.setattr(napari_discreg, "adapt_steps", interrupted)
    out = tmp_path / "a.safetensors"
    argv = ["adapt", "-o", out, "--model", tiny_model, "--demo-target", 1, "--size", SIZE]
    assert run(*argv, "--steps", 50) == 130
    meta = checkpoint_info(out)["adaptation"]
    assert meta["interrupted"] is True and meta["completed_steps"] == 1
    assert meta["best_iteration"] == 1 and meta["best_criterion"] == 1.20
    assert "interrupted after 1 of 50 iterations" in capsys.readouterr().out


def test_adapt_checkpoints_and_resumes(tmp_path, tiny_model, capsys, monkeypatch):
    out = tmp_path / "a.safetensors"
    state = tmp_path / "a.state.safetensors"
    argv = ["adapt", "-o", out, "--model", tiny_model, "--demo-target", 2, "--size", SIZE]
    argv += ["--batch-size", 2, "--checkpoint-every", 2]

    # Ctrl-C between iterations 3 and 4: the state holds the complete iteration 3
    import napari_discreg.cli.adapt as cli_mod

    real_progress = cli_mod._progress

    def progress(*args, **kwargs):
        bar = real_progress(*args, **kwargs)
        update = bar.update

        def stop_at_3(n=1):
            update(n)
            if bar.n == 3:
                raise KeyboardInterrupt

        bar.update = stop_at_3
        return bar

    monkeypatch.setattr(cli_mod, "_progress", progress)
    assert run(*argv, "--steps", 6) == 130
    assert f"adapt --resume {state}" in capsys.readouterr().out
    monkeypatch.setattr(cli_mod, "_progress", real_progress)
    saved = checkpoint_info(state)
    assert saved["adaptation_state"]["step"] == 3 and saved["adaptation_run"]["steps"] == 6

    # a contradicting option is refused, a matching one is fine
    assert run("adapt", "-o", out, "--resume", state, "--discrepancy", "l1") == 2
    assert "--discrepancy differs" in _error(capsys)
    assert run("adapt", "-o", out, "--resume", state, "--size", SIZE) == 0
    meta = checkpoint_info(out)["adaptation"]
    assert meta["completed_steps"] == 6 and meta["steps"] == 6
    assert meta["resumed_from"] == str(state) and meta["base_model"] == str(tiny_model)
    assert "resuming" in capsys.readouterr().out
    assert checkpoint_info(state)["adaptation_state"]["step"] == 6

    # extend the finished run by two iterations
    assert run("adapt", "-o", out, "--resume", state, "--steps", 8) == 0
    assert checkpoint_info(out)["adaptation"]["completed_steps"] == 8
    capsys.readouterr()
    assert run("adapt", "-o", out, "--resume", state, "--steps", 4) == 2
    assert "at iteration 8" in _error(capsys)
    assert run("adapt", "-o", out, "--resume", tiny_model) == 2
    assert "holds no adaptation run" in _error(capsys)


def test_adapt_reads_folders_and_stacks(tmp_path, tiny_model, pair_files):
    fixed, moving = (imagefiles.read_image(p) for p in pair_files)
    (tmp_path / "fixed").mkdir()
    for i in range(2):
        imagefiles.write_image(tmp_path / "fixed" / f"{i}.tif", fixed)
    stack = imagefiles.write_image(tmp_path / "moving.npy", np.stack([moving, moving]))
    out = tmp_path / "a.safetensors"
    argv = ["adapt", "-o", out, "--model", tiny_model, "--steps", 0, "--size", SIZE]
    assert run(*argv, "--target-fixed", tmp_path / "fixed", "--target-moving", stack) == 0
    meta = checkpoint_info(out)["adaptation"]
    assert meta["target_pairs"] == 2 and "2 images in" in meta["target"]


def test_adapt_input_errors(tmp_path, tiny_model, pair_files, capsys):
    out = tmp_path / "a.safetensors"
    base = ["adapt", "-o", out, "--model", tiny_model]
    assert run(*base) == 2
    assert "--target-fixed" in _error(capsys)
    assert run(*base, "--demo-target", 2, "--target-fixed", pair_files[0]) == 2
    assert "not both" in _error(capsys)
    three = imagefiles.write_image(
        tmp_path / "three.npy", np.random.default_rng(0).random((3, SIZE, SIZE))
    )
    two = imagefiles.write_image(
        tmp_path / "two.npy", np.random.default_rng(1).random((2, SIZE, SIZE))
    )
    assert run(*base, "--target-fixed", three, "--target-moving", two) == 2
    assert "counts must be equal" in _error(capsys)
    (tmp_path / "empty").mkdir()
    assert run(*base, "--target-fixed", tmp_path / "empty", "--target-moving", two) == 2
    assert "holds no images" in _error(capsys)
    assert run(*base, "--target-fixed", tmp_path / "x.tif", "--target-moving", two) == 2
    assert "x.tif: no such file" in _error(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------- demo


def test_demo_with_model(tmp_path, tiny_model, capsys):
    out = tmp_path / "demo"
    assert run("demo", "-o", out, "--size", SIZE, "--model", tiny_model, "--device", "cpu") == 0
    assert _tree(out) == ["report.json", "report.md", "report.png"]
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert m["epe_px"]["identity"] > 0 and m["epe_px"]["registered"] >= 0
    assert set(m["dice"]) == {"csf", "gm", "wm"}
    assert all(0 <= v["before"] <= 1 and 0 <= v["after"] <= 1 for v in m["dice"].values())
    assert 0 <= m["folding_fraction"] <= 1 and 0 <= m["label_accuracy"] <= 1
    assert report["pair"] == {
        "fixed_contrast": "t1",
        "moving_contrast": "t2",
        "slice": 116,
        "size": SIZE,
        "seed": 0,
    }
    assert "| Dice GM |" in (out / "report.md").read_text()
    from PIL import Image

    with Image.open(out / "report.png") as png:
        assert png.size[0] > 1000
    assert f"report: {out / 'report.png'}" in capsys.readouterr().out


def test_demo_with_shipped_model(tmp_path):
    assert run("demo", "-o", tmp_path, "--size", "96", "--device", "cpu") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    m = report["metrics"]
    assert set(m["epe_px"]) == {"identity", "registered"}
    assert all(np.isfinite(v) for v in m["epe_px"].values())
    assert m["epe_px"]["identity"] > 0.5  # the sample pair really is misaligned
    assert m["method"] == DEFAULT_METHOD and m["refine_steps"] == 0
    assert m["epe_px"]["registered"] < 0.6 * m["epe_px"]["identity"]
    assert m["nmi"]["after"] > m["nmi"]["before"]
    md = (tmp_path / "report.md").read_text()
    assert f"{m['epe_px']['registered']:.3f}" in md
    assert "network_only" not in m  # the default is the network: nothing to compare with
    # the shipped real stain pair, from the raw RGB images of different sizes
    real = report["real_pair"]
    assert real["landmarks"] == 78 and real["fixed_shape"] != real["moving_shape"]
    assert real["median_tre_px"]["after"] < 0.2 * real["median_tre_px"]["before"]
    assert real["robustness"] > 0.9
    assert "A real stain pair" in md


def test_demo_without_refinement(tmp_path, tiny_model):
    argv = ["demo", "-o", tmp_path, "--size", SIZE, "--model", tiny_model, "--refine", 0]
    argv.append("--no-real-pair")
    assert run(*argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["refine_steps"] == 0 and "network_only" not in report["metrics"]
    assert report["metrics"]["method"] == "network"
    assert (
        "registration: affine pre-alignment, then the network"
        in (tmp_path / "report.md").read_text()
    )


# ---------------------------------------------------------------------- entry points


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("register", "train", "adapt", "demo"):
        assert command in out
    assert main([]) == 2
    assert main(["frobnicate"]) == 2


def test_python_m(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["napari_discreg", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("napari_discreg", run_name="__main__")
    assert exc.value.code == 0
    assert "napari-discreg 0.1.0" in capsys.readouterr().out


def test_console_script_reports_user_errors_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("napari-discreg")
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    argv = ["register", tmp_path / "f.png", tmp_path / "m.png", "-o", tmp_path / "o"]
    proc = subprocess.run(
        [str(script), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("napari-discreg: error: ")
    assert "f.png: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- memory limit


def test_max_memory_gb_refuses_register_and_adapt_before_they_start(
    tmp_path, tiny_model, capsys, monkeypatch
):
    """``--max-memory-gb`` bounds core.memory's estimate for every command; the refusal
    comes before any output exists (exit 2, the number and a hint in the message)."""
    monkeypatch.delenv("NAPARI_DISCREG_MAX_MEMORY_GB", raising=False)
    fixed, moving = tmp_path / "f.npy", tmp_path / "m.npy"
    pair = make_pair(
        load_template(SIZE), 110, "t1", "t2", np.random.default_rng(0), DataConfig(size=SIZE)
    )
    np.save(fixed, pair.fixed)
    np.save(moving, pair.moving)
    out = tmp_path / "out"
    argv = ["register", fixed, moving, "-o", out, "--model", tiny_model, "--max-memory-gb", "1e-6"]
    assert run(*argv) == 2
    err = _error(capsys)
    assert "GB" in err and "downsample or crop" in err
    assert not out.exists()
    model_out = tmp_path / "a.safetensors"
    argv = ["adapt", "-o", model_out, "--model", tiny_model, "--demo-target", 1]
    assert run(*argv, "--size", SIZE, "--max-memory-gb", "1e-6") == 2
    err = capsys.readouterr().err  # refused before the first iteration
    assert "napari-discreg: error:" in err and "would need about" in err
    assert "smaller" in err and "Traceback" not in err
    assert not model_out.exists()
    assert run("register", fixed, moving, "-o", out, "--max-memory-gb", "-1") == 2  # usage


def test_register_colour_files_of_different_sizes_and_spacings(tmp_path, tiny_model, pair_files):
    """RGB files of other sizes register onto the fixed grid; a NIfTI header's spacing is
    read, and --moving-spacing overrides it."""
    from PIL import Image

    fixed = imagefiles.read_image(pair_files[0])
    rgb = (np.stack([fixed, fixed * 0.5, 1 - fixed], -1) / fixed.max() * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "f.png")
    moving = np.pad(imagefiles.read_image(pair_files[1]), ((3, 5), (0, 9)))
    import nibabel as nib

    nib.save(nib.Nifti1Image(moving[..., None], np.diag([0.5, 2.0, 1.0, 1.0])), tmp_path / "m.nii")
    assert imagefiles.read_spacing(tmp_path / "m.nii") == (0.5, 2.0)
    assert imagefiles.read_spacing(tmp_path / "f.png") == (1.0, 1.0)
    out = tmp_path / "o"
    args = ["register", tmp_path / "f.png", tmp_path / "m.nii", "-o", out, "--model", tiny_model]
    assert run(*args, "--moving-spacing", 1, 1) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shape"] == [SIZE, SIZE] and summary["moving_shape"] == list(moving.shape)
    assert summary["moving_spacing"] == [1.0, 1.0]
    assert np.load(out / "displacement.npy").shape == (2, SIZE, SIZE)
    assert imagefiles.read_image(out / "warped.tif").shape == (SIZE, SIZE)
    assert run(*args, "-o", tmp_path / "o2", "--prealign", "none", "--method", "none") == 0
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert summary["moving_spacing"] == [0.5, 2.0]
    u = np.load(tmp_path / "o2" / "displacement.npy")
    # no motion in physical space: fixed pixel (r, c) is moving pixel (r / 0.5, c / 2)
    np.testing.assert_allclose(u[0, 10, 10], 10 / 0.5 - 10, atol=1e-4)
    np.testing.assert_allclose(u[1, 10, 10], 10 / 2.0 - 10, atol=1e-4)
