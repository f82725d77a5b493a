"""Training and adaptation runs from Python, without the command line (napari_discreg.runs).

The tiny model of conftest.py stands in for a trained one and every image is 48 px:
the tests check the plumbing (records, metadata, states, resume, close), not accuracy.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_discreg import save_model
from napari_discreg.core.config import AdaptConfig, DataConfig, FolderConfig, TrainConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files import imagefiles
from napari_discreg.core.files.checkpoint import checkpoint_info, load_model
from napari_discreg.core.files.resume import load_adaptation_state
from napari_discreg.runs import (
    AdaptationProgress,
    AdaptationSpec,
    ArrayTargets,
    DemoTargets,
    FolderTargets,
    TrainingProgress,
    TrainingSpec,
    resolve_training,
    run_adaptation,
    run_training,
)

SIZE = 48
DATA = DataConfig(size=SIZE)
ADAPT_KEYS = {
    "discrepancy",
    "steps",
    "completed_steps",
    "best_iteration",
    "selection_criterion",
    "initial_criterion",
    "best_criterion",
    "config",
    "data_config",
    "folder_config",
    "target",
    "target_pairs",
    "pairing",
    "pairing_note",
    "skipped",
    "source",
    "evaluation",
    "evaluation_before",
    "selection",
    "base_model",
    "resumed_from",
    "interrupted",
    "diverged",
    "pair_check",
    "device",
    "distributed",
    "runtime_s",
}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def _demo_spec(model, **kwargs) -> AdaptationSpec:
    return AdaptationSpec(
        targets=DemoTargets(2),
        model=model,
        config=AdaptConfig(batch_size=2, select_every=1),
        data_config=DATA,
        device="cpu",
        **kwargs,
    )


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """t1/ and t2/: two co-registered 'subjects' as NIfTI volumes (x, y, z)."""
    root = tmp_path_factory.mktemp("scans")
    template = data.load_template(SIZE)
    for s, lo in enumerate((50, 70)):
        t1 = np.asarray(template.t1[lo : lo + 6])
        t2 = np.stack(
            [
                data.synthesize_contrast(template, k, "t2", np.random.default_rng(k), DATA)
                for k in range(lo, lo + 6)
            ]
        )
        for name, vol in (("t1", t1), ("t2", t2)):
            (root / name).mkdir(exist_ok=True)
            imagefiles.write_image(root / name / f"sub{s}.nii.gz", vol.transpose(1, 2, 0) * 800.0)
    return root


def test_adaptation_on_demo_pairs(tiny_model):
    start = _weights(tiny_model)
    messages: list[str] = []
    run = run_adaptation(_demo_spec(tiny_model, steps=2, command="python", log=messages.append))
    assert (run.start_step, run.total) == (0, 2)
    records = list(run)
    assert all(isinstance(r, AdaptationProgress) for r in records)
    assert [r.iteration for r in records] == [0, 1, 2]
    assert records[0].criterion is not None and records[-1].best_iteration in (0, 1, 2)
    result = run.result
    assert result is not None and not result.interrupted and result.diverged is None
    meta = result.metadata
    assert set(meta) == {"adaptation", "base_model_info", "command", "napari_discreg_version"}
    assert set(meta["adaptation"]) == ADAPT_KEYS
    adaptation = meta["adaptation"]
    assert adaptation["completed_steps"] == 2 and adaptation["target_pairs"] == 2
    assert adaptation["base_model"] == "in-memory model" and meta["command"] == "python"
    assert adaptation["best_criterion"] >= adaptation["initial_criterion"]
    assert result.state_path is None and not result.state_saved
    # the model passed in is untouched; the result holds the best weights by the criterion
    assert _same(_weights(tiny_model), start)
    if result.best_iteration == 0:
        assert _same(_weights(result.model), start)
    else:
        assert not _same(_weights(result.model), start)
    assert messages == []  # demo targets and the template source say nothing


def test_array_targets_and_a_model_file(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "tiny.safetensors")
    rng = np.random.default_rng(0)
    fixed = rng.random((2, SIZE, SIZE)).astype(np.float32)
    run = run_adaptation(
        AdaptationSpec(
            targets=ArrayTargets(fixed, np.roll(fixed, 2, axis=2), "two noise pairs"),
            model=path,
            steps=1,
            config=AdaptConfig(batch_size=2),
            data_config=DATA,
            device="cpu",
        )
    )
    for _ in run:
        pass
    meta = run.result.metadata["adaptation"]
    assert meta["target"] == "two noise pairs" and meta["base_model"] == str(path)
    assert run.result.metadata["base_model_info"] == {}
    with pytest.raises(ValueError, match="counts must be equal"):
        run_adaptation(
            AdaptationSpec(targets=ArrayTargets(fixed, fixed[:1]), model=path, device="cpu")
        )


def test_folder_adaptation_with_holdout(tiny_model, scans):
    messages: list[str] = []
    run = run_adaptation(
        AdaptationSpec(
            targets=FolderTargets(scans / "t2"),
            source=scans / "t1",
            model=tiny_model,
            steps=1,
            config=AdaptConfig(batch_size=2),
            data_config=DATA,
            folder_config=FolderConfig(target_pairs=4, eval_pairs=2, val_fraction=0.5),
            device="cpu",
            log=messages.append,
        )
    )
    for _ in run:
        pass
    result = run.result
    assert any("target pairs: paired" in m for m in messages)
    assert result.evaluation_before is not None
    assert set(result.evaluation) == {"pairs", "held_out", "identity", "before", "after"}
    assert result.evaluation["pairs"] == 2
    assert result.evaluation["before"] == result.evaluation_before["model"]
    meta = result.metadata["adaptation"]
    assert meta["pairing"] == "paired" and meta["target_pairs"] == 4
    assert meta["evaluation"] == result.evaluation and "mono-modal" in meta["source"]


def test_close_keeps_the_best_weights_and_resume_continues(tmp_path, tiny_model):
    spec = _demo_spec(tiny_model, steps=4)
    full = run_adaptation(spec)  # the same run, never interrupted
    for _ in full:
        pass

    state = tmp_path / "a.state.safetensors"
    run = run_adaptation(_demo_spec(tiny_model, steps=4, checkpoint_every=2, state_path=state))
    for progress in run:
        if progress.iteration == 3:
            break
    result = run.close()
    assert result is run.result and result.interrupted and result.completed_steps == 3
    assert result.state_saved and result.state_path == state
    assert result.metadata["adaptation"]["interrupted"] is True
    _, saved, _ = load_adaptation_state(state, spec.config.lr, "cpu")
    assert saved.step == 3 and saved.best_iteration == result.best_iteration
    assert _same(_weights(result.model), saved.best_weights)  # the best weights are kept
    assert run.close() is result  # closing again changes nothing

    with pytest.raises(ValueError, match="^discrepancy differs"):
        run_adaptation(AdaptationSpec(resume=state, discrepancy="l1"))
    resumed = run_adaptation(AdaptationSpec(resume=state))
    assert (resumed.start_step, resumed.total) == (3, 4)
    # the saved run's whole AdaptConfig comes back, not today's defaults
    assert resumed.spec.config == replace(spec.config, steps=4)
    assert [p.iteration for p in resumed] == [3, 4]
    result = resumed.result
    assert result.completed_steps == 4 and not result.interrupted
    assert result.metadata["adaptation"]["resumed_from"] == str(state)
    assert checkpoint_info(state)["adaptation_state"]["step"] == 4
    # bit-identical on CPU to the run that was never interrupted
    assert _same(_weights(result.model), _weights(full.result.model))


def test_training_run(tmp_path, tiny_config):
    spec = TrainingSpec(
        model_config=tiny_config,
        config=TrainConfig(steps=2, batch_size=2),
        data_config=DATA,
        device="cpu",
        checkpoint_every=1,
        state_path=tmp_path / "t.state.safetensors",
    )
    run = run_training(spec)
    records = list(run)
    assert all(isinstance(r, TrainingProgress) for r in records)
    assert [r.iteration for r in records] == [1, 2] and "loss" in records[-1].losses
    result = run.result
    assert result.completed_steps == 2 and not result.interrupted
    info = result.metadata["training"]
    assert info["completed_steps"] == 2 and info["steps"] == 2 and len(info["loss_curve"]) == 2
    assert result.model.config == tiny_config
    assert load_model(result.state_path, "cpu").config == tiny_config

    # closed after one step of three, then resumed to the end
    run = run_training(replace(spec, config=TrainConfig(steps=3, batch_size=2)))
    next(run)
    closed = run.close()
    assert closed.interrupted and closed.completed_steps == 1
    resumed = run_training(TrainingSpec(resume=result.state_path, device="cpu"))
    assert resumed.start_step == 1 and [r.iteration for r in resumed] == [2, 3]


def test_run_messages_name_settings_and_the_cli_names_its_flags(capsys):
    """The runs are shared by the widget, the API and the command line: their messages
    name spec fields; only the command line turns them into its flags."""
    from napari_discreg.cli import main
    from napari_discreg.runs.base import SettingError
    from napari_discreg.runs.targets import TargetOptions, check_target_options

    with pytest.raises(SettingError) as err:
        check_target_options(TargetOptions(demo_target=2, target_fixed="f.tif"), None)
    assert "--" not in str(err.value) and "demo_target" in str(err.value)
    assert main(["adapt", "-o", "m.safetensors", "--demo-target", "2", "--target-fixed", "x"]) == 2
    assert "give either --demo-target or --target-fixed/--target-moving" in capsys.readouterr().err


def test_a_resumed_training_refuses_a_contradicting_setting(tmp_path, capsys):
    """Resume means one thing for training and adaptation: the saved run's settings,
    and a setting given that contradicts them is refused (before: training took the
    saved settings and silently ignored --steps, --lr, ... given with --resume)."""
    from napari_discreg.cli import main

    out = tmp_path / "m.safetensors"
    tiny = ["--num-labels", "5", "--capture-range", "2", "--features", "4", "--head-channels", "8"]
    base = ["train", "-o", str(out), "--steps", "2", "--size", "32", *tiny]
    assert main([*base, "--checkpoint-every", "1"]) == 0
    state = tmp_path / "m.state.safetensors"
    capsys.readouterr()
    assert main(["train", "--resume", str(state), "-o", str(out), "--lr", "0.5"]) == 2
    assert "--lr differs from the run saved in" in capsys.readouterr().err
    assert main(["train", "--resume", str(state), "-o", str(out), *base[3:]]) == 0  # the same
    with pytest.raises(ValueError, match=r"^steps differs from the run saved"):
        resolve_training(TrainingSpec(resume=state, config=TrainConfig(steps=7)))
