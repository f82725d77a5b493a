"""The adaptation widget: progress, Stop within one step, Keep/Revert, Save, no leaked
workers; folder targets with a held-out evaluation, resumable states."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from qtpy.QtCore import QThreadPool
from qtpy.QtWidgets import QFileDialog

from napari_discreg import load_model, register
from napari_discreg._widgets import AdaptationWidget, RegisterWidget, state_for
from napari_discreg.core.config import DataConfig, FolderConfig
from napari_discreg.core.data.template import load_template, synthesize_contrast
from napari_discreg.core.files import imagefiles

SMALL = 96  # px of the images written to the folders (slices are resized to 64)


def _adaptation(viewer, small_targets, model, *, adapt_config, data_config, steps):
    """Target stacks as layers, ``model`` as the current model, a fast adaptation widget."""
    fixed, moving = small_targets
    viewer.add_image(fixed, name="target fixed")
    viewer.add_image(moving, name="target moving")
    state_for(viewer).set_model(model, "tiny")
    widget = AdaptationWidget(viewer)
    widget.adapt_config = adapt_config
    widget.data_config = data_config
    widget.steps_spin.setValue(steps)
    return widget


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adapt_progress_stop_keep_reregister_revert_save(
    viewer, qtbot, tiny_model, small_pair, small_targets, tmp_path, wait_job, notes, fast
):
    before = _weights(tiny_model)
    viewer.add_image(small_pair.fixed, name="fixed")
    viewer.add_image(small_pair.moving, name="moving")
    register_widget = RegisterWidget(viewer)
    # keep_best=False: the stopped run offers its last weights (with keep_best, weights
    # that score no better than the start are not offered: test_stop_without_improvement)
    fast = {**fast, "adapt_config": replace(fast["adapt_config"], keep_best=False)}
    widget = _adaptation(viewer, small_targets, tiny_model, **fast, steps=200)
    assert widget.fixed_combo.layer().name == "target fixed"
    assert widget.moving_combo.layer().name == "target moving"
    assert (
        register_widget.fixed_combo.layer().name,
        register_widget.moving_combo.layer().name,
    ) == (
        "fixed",
        "moving",
    )
    assert widget.discrepancy() == "pemd"  # the default
    job = widget.start()
    assert job is not None and widget.is_running
    assert not widget.start_button.isEnabled() and widget.stop_button.isEnabled()
    qtbot.waitUntil(lambda: len(widget.records) >= 2, timeout=60_000)
    assert widget.progress.value() >= 1 and widget.progress.maximum() == 200
    assert widget.plot.iterations and np.isfinite(widget.plot.source_ce).all()
    assert widget.records[0].criterion is not None  # the selection criterion at iteration 0
    widget.stop()
    at_stop = widget.worker_iteration  # the worker may be ahead of the records delivered so far
    wait_job(job)
    assert widget.records[-1].iteration <= at_stop + 1  # stopped within one iteration
    assert widget.records[-1].iteration < 200
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()
    adapted = widget.adapted_model
    assert adapted is not None and adapted is not tiny_model
    # adaptation worked on a clone: the current model is untouched until Keep
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert widget.keep_button.isEnabled() and widget.revert_button.isEnabled()

    # Keep: the Register widget now registers with the adapted model
    assert widget.keep()
    assert state_for(viewer).model is adapted
    assert register_widget.model_box.model_label.text().startswith("adapted")
    wait_job(widget.reregister())
    run = state_for(viewer).run
    assert run.model_name.startswith("adapted")
    expected = register(small_pair.fixed, small_pair.moving, model=adapted)
    np.testing.assert_allclose(run.results[None].probabilities, expected.probabilities, atol=1e-6)

    # Save: the file holds exactly the adapted weights
    path = widget.save(tmp_path / "adapted.safetensors")
    reloaded = load_model(path, "cpu")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in adapted.state_dict().items())

    # Revert: the previous model with bit-identical weights
    assert widget.revert()
    current = state_for(viewer).model
    assert current is tiny_model and state_for(viewer).model_name == "tiny"
    after = current.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert register_widget.model_box.model_label.text() == "tiny"
    assert not [n for n in notes if n[0] == "error"]


def test_stop_without_improvement_offers_nothing(
    viewer, qtbot, tiny_model, small_targets, wait_job, fast
):
    """With keep-best, a run whose weights never score better than the start leaves the
    model unchanged and says so: Keep and Save stay disabled (no fake "adapted" model)."""
    widget = _adaptation(viewer, small_targets, tiny_model, **fast, steps=200)
    job = widget.start()
    qtbot.waitUntil(lambda: len(widget.records) >= 2, timeout=60_000)
    widget.stop()
    wait_job(job)
    result = widget.result
    assert result is not None and result.interrupted
    if result.best_iteration == 0:  # the stopped weights scored no better than the start
        assert widget.adapted_model is None
        assert not widget.keep_button.isEnabled() and not widget.save_button.isEnabled()
        assert "unchanged" in widget.status_label.text()
        assert widget.revert_button.isEnabled()
    else:  # they scored better: offered like any adapted model
        assert widget.adapted_model is result.model and widget.keep_button.isEnabled()


def test_closing_the_panel_stops_the_run(
    make_napari_viewer, qtbot, tiny_model, small_targets, notes, fast
):
    """napari's dock close button un-parents the widget without a close event: the run
    stops at once and a notification says so."""
    viewer = make_napari_viewer()
    widget = _adaptation(viewer, small_targets, tiny_model, **fast, steps=10_000)
    dock = viewer.window.add_dock_widget(widget, name="Adaptation")
    job = widget.start()
    qtbot.waitUntil(lambda: len(widget.records) >= 1, timeout=60_000)
    dock.title.close_button.click()  # what the panel's x does
    qtbot.waitUntil(lambda: not job.is_running, timeout=30_000)
    assert job.stop_event.is_set()
    assert any("panel was closed" in text for _, text in notes)


def test_closing_widget_or_viewer_stops_the_worker(
    make_napari_viewer, qtbot, tiny_model_path, small_targets, fast
):
    for close_viewer in (False, True):
        viewer = make_napari_viewer()
        widget = _adaptation(
            viewer,
            small_targets,
            load_model(tiny_model_path, "cpu"),
            **fast,
            steps=10_000,
        )
        if close_viewer:  # docked in a (hidden) viewer window, as napari's plugin menu does
            viewer.window.add_dock_widget(widget, name="adaptation")
        job = widget.start()
        records = widget.records
        qtbot.waitUntil(lambda: len(records) >= 1, timeout=60_000)  # noqa: B023 - used at once
        if close_viewer:
            viewer.close()
        else:
            widget.close()
        assert not job.is_running  # closing waited for the worker
        assert job.stop_event.is_set()
        assert widget.records[-1].iteration < 10_000
        qtbot.waitUntil(
            lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=5_000
        )


# ------------------------------------------------------------------ folders and resume


@pytest.fixture(scope="module")
def contrast_folders(tmp_path_factory):
    """fixed/ (T1) and moving/ (T2-like): the same three subjects as PNG, TIFF and .npy."""
    root = tmp_path_factory.mktemp("contrasts")
    template = load_template(SMALL)
    config = DataConfig(size=SMALL)
    for name in ("fixed", "moving"):
        (root / name).mkdir()
    for ext, k in ((".png", 100), (".tif", 110), (".npy", 120)):
        t1 = np.asarray(template.t1[k])
        t2 = synthesize_contrast(template, k, "t2", np.random.default_rng(k), config)
        for name, image in (("fixed", t1), ("moving", t2)):
            imagefiles.write_image(
                root / name / f"sub{k}{ext}", (np.clip(image, 0, 1) * 255).astype(np.uint8)
            )
    return root


def _folder_widget(viewer, model, folders, fast, monkeypatch, *, steps):
    state_for(viewer).set_model(model, "tiny")
    widget = AdaptationWidget(viewer)
    widget.adapt_config, widget.data_config = fast["adapt_config"], fast["data_config"]
    widget.folder_config = FolderConfig(target_pairs=4, eval_pairs=2)
    widget.steps_spin.setValue(steps)
    widget.set_target_source("folders")
    assert widget.folder_box.isVisibleTo(widget) and not widget.layer_box.isVisibleTo(widget)
    # the Browse… buttons fill the line edits with the folder chosen
    chosen = iter([str(folders / "fixed"), str(folders / "moving")])
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: next(chosen))
    widget.folder_box.fixed_browse.click()
    widget.folder_box.moving_browse.click()
    return widget


def test_folder_targets_with_holdout_show_the_evaluation(
    viewer, tiny_model, contrast_folders, fast, wait_job, notes, monkeypatch
):
    widget = _folder_widget(viewer, tiny_model, contrast_folders, fast, monkeypatch, steps=2)
    assert widget.folder_box.fixed_edit.text() == str(contrast_folders / "fixed")
    assert widget.folder_box.holdout_spin.value() == FolderConfig().val_fraction
    widget.folder_box.holdout_spin.setValue(0.34)  # one of the three subjects
    wait_job(widget.start())
    assert not [n for n in notes if n[0] == "error"], notes
    result = widget.result
    assert result is not None and not result.interrupted and result.completed_steps == 2
    assert result.evaluation is not None and result.evaluation["pairs"] == 2
    assert "1 of 3 files held out" in result.evaluation["held_out"]
    status = widget.status_label.text()
    assert "finished after 2 of 2 iterations" in status
    assert "Held-out evaluation (2 pairs)" in status and "before ->" in status
    meta = result.metadata["adaptation"]
    assert meta["pairing"] == "paired" and meta["folder_config"]["val_fraction"] == 0.34
    # the weights were judged on target pairs held out of the adaptation, and it says so
    assert "held-out target pair(s), not adapted on" in status and result.held_out
    if result.unchanged:  # nothing scored better there: nothing to keep
        assert "nothing to keep" in status and not widget.keep()
        assert state_for(viewer).model is not widget.adapted_model
    else:
        assert widget.keep() and state_for(viewer).model is widget.adapted_model


def test_an_empty_or_missing_folder_is_an_error_and_starts_nothing(
    viewer, tiny_model, contrast_folders, fast, notes, monkeypatch, tmp_path
):
    widget = _folder_widget(viewer, tiny_model, contrast_folders, fast, monkeypatch, steps=2)
    (tmp_path / "empty").mkdir()
    for fixed, expected in (
        (tmp_path / "empty", "holds no images"),
        (tmp_path / "missing", "no such file or folder"),
        ("", "choose a folder"),
    ):
        widget.folder_box.fixed_edit.setText(str(fixed))
        assert widget.start() is None
        assert notes[-1][0] == "error" and expected in notes[-1][1], notes
        assert widget.job is None and widget.start_button.isEnabled()
    assert state_for(viewer).model is tiny_model


def test_save_state_stop_then_resume_continues_to_the_total(
    viewer, qtbot, tiny_model, small_targets, fast, wait_job, notes, tmp_path, monkeypatch
):
    total = 12
    widget = _adaptation(viewer, small_targets, tiny_model, **fast, steps=total)
    state = tmp_path / "states" / "run.state.safetensors"
    widget.state_box.every_spin.setValue(1)
    widget.state_box.path_edit.setText(str(state))
    job = widget.start()
    qtbot.waitUntil(lambda: len(widget.records) >= 2, timeout=60_000)  # iteration 1 done
    widget.stop()
    wait_job(job)
    first = widget.result
    assert first.interrupted and 0 < first.completed_steps < total, first
    assert first.state_saved and first.state_path == state and state.is_file()
    assert "Resumable state: " + str(state) in widget.status_label.text()

    # Resume… (the file dialog picks the state): continues where the first run stopped
    widget.steps_spin.setValue(2)  # smaller than the saved total: the saved total wins
    widget.state_box.path_edit.setText("")  # the resumed run writes back to its file
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(state), ""))
    widget.state_box.resume_button.click()
    job = widget.job
    assert job is not None and job.is_running
    wait_job(job)
    assert not [n for n in notes if n[0] == "error"], notes
    second = widget.result
    assert second is not first and not second.interrupted
    assert second.start_step == first.completed_steps and second.completed_steps == total
    assert widget.records[0].iteration == first.completed_steps
    assert widget.records[-1].iteration == total and widget.progress.value() == total
    assert widget.steps_spin.value() == total and second.state_path == state
    assert second.metadata["adaptation"]["resumed_from"] == str(state)
    assert f"finished after {total} of {total} iterations" in widget.status_label.text()


def test_resuming_a_file_without_a_run_is_an_error(viewer, tiny_model_path, notes):
    widget = AdaptationWidget(viewer)
    assert widget.resume(tiny_model_path) is None  # a model, not a state
    assert notes[-1][0] == "error" and "holds no adaptation run" in notes[-1][1]
    assert widget.job is None


def test_one_click_adapts_the_network_to_the_registered_pair(
    viewer, tiny_model, tiny_model_path, small_pair, wait_job, notes, fast
):
    """Issue 25 item 2: the pair in view, as the network saw it after the pre-alignment."""
    state_for(viewer).set_model(tiny_model, "tiny")
    widget = AdaptationWidget(viewer)
    widget.adapt_config, widget.data_config = fast["adapt_config"], fast["data_config"]
    widget.steps_spin.setValue(3)
    # nothing registered yet: a clear refusal, nothing starts
    assert widget.adapt_to_registered_pair() is None
    assert "register a pair first" in widget.status_label.text()

    viewer.add_image(small_pair.fixed, name="fixed")
    viewer.add_image(small_pair.moving, name="moving")
    register_widget = RegisterWidget(viewer)
    wait_job(register_widget.run())
    wait_job(widget.adapt_to_registered_pair())
    assert widget.target_source() == "registered"
    result = widget.result
    assert result is not None and result.completed_steps == 3
    target = result.metadata["adaptation"]["target"]
    assert "tiles of the registered pair 'fixed' (fixed) / 'moving'" in target
    assert widget.status_label.text().startswith("finished after 3 of 3 iterations")
    errors = [text for level, text in notes if level == "error"]
    assert len(errors) == 1 and errors[0].startswith("register a pair first"), errors
    # the run judges what it would keep by registering the pair itself again
    from napari_discreg._widgets._adaptation_targets import registered_targets

    targets = registered_targets(state_for(viewer).run)
    ((f, m, affine),) = targets.registered
    registered = state_for(viewer).run.results[None]
    assert f.shape == small_pair.fixed.shape and m.shape == small_pair.moving.shape
    assert np.array_equal(affine, registered.affine)
    check = result.metadata["adaptation"]["pair_check"]
    assert (check is None) == (result.pair_check is None)
    if check is not None:
        assert result.best_iteration == (check["iteration"] if check["kept"] else 0)
