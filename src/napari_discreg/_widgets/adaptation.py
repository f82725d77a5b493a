"""Adaptation widget: adapt the current model to the contrast of some target pairs.

The widget builds an :class:`~napari_discreg.runs.AdaptationSpec` in the GUI thread
(bad input: an error notification, nothing starts) and consumes
:func:`~napari_discreg.runs.run_adaptation` in a background thread, as the command line
does. Target pairs come from two Image layers or from a fixed- and a moving-contrast
folder (paired subject by subject, with a held-out evaluation before and after). *Start*
adapts a copy of the current model; every iteration updates the progress bar and the
live plot (source cross-entropy, target discrepancy, and the unsupervised selection
criterion whenever it is evaluated). *Stop* closes the run after the iteration in
progress: the copy then holds the best weights by the criterion, and the resumable
state is saved when asked (*Save a resumable state every N iterations*); *Resume…*
continues a saved state. Afterwards: *Keep* makes the adapted model the current one
(the Register widget uses it), *Revert* restores the previous model with its exact
weights, *Save…* writes the adapted model, *Re-register* registers again with it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)

# ``save_model`` is looked up in the package's public API when used
import napari_discreg

from ..core.config import ADAPT_METHODS, AdaptConfig, DataConfig, FolderConfig
from ..core.learning.adapt import snapshot_weights
from ..core.learning.discrepancy import DISPLAY_NAMES, Discrepancy
from ..runs import AdaptationSpec, resolve_adaptation, run_adaptation
from . import _notify
from ._adaptation_plot import AdaptationPlot
from ._adaptation_targets import (
    TARGET_SOURCES,
    FolderTargetsBox,
    LayerTargetsBox,
    StateBox,
    array_run,
    registered_targets,
    result_text,
    saved_configs,
    saved_run,
    target_source_combo,
    unchanged,
    warnings_text,
)
from ._io import CHECKPOINT_FILTER
from ._qt import row, scrolled_layout, select_data, tabbed_panel
from ._state import state_for, unwrap_viewer
from ._workers import Job, WorkerWidgetMixin, job_controls

_LABELS = {
    Discrepancy.PEMD: "pEMD (projected Earth Mover's)",
    Discrepancy.PEMD16_SWD: "pEMD 16+ (16 directions + SWD, the paper's best)",
    Discrepancy.PEMD16: "pEMD 16 (16 projection directions)",
    Discrepancy.SWD: "SWD (sliced Wasserstein)",
    Discrepancy.L1: "L1 (MCD)",
}
METHOD_LABELS = {
    "self-training": "self-training (default)",
    "mcd": "MCD (the paper's)",
}
assert set(METHOD_LABELS) == set(ADAPT_METHODS)

# every member of Discrepancy, the default (pEMD) first
DISCREPANCIES = {
    kind.value: _LABELS.get(kind, DISPLAY_NAMES.get(kind, kind.value))
    for kind in [*_LABELS, *(k for k in Discrepancy if k not in _LABELS)]
}


class AdaptationWidget(WorkerWidgetMixin, QWidget):
    """Unsupervised adaptation of the current model to new target pairs.

    Attributes
    ----------
    adapt_config : AdaptConfig
        Settings of the run (steps and learning rate come from the spin boxes).
    data_config : DataConfig
        Source pairs used for the supervised part of each iteration.
    folder_config : FolderConfig
        How folder targets are read (the hold-out fraction comes from the form).
    adapted_model : DiscreteRegistrationNet or None
        The adapted copy after a run.
    result : AdaptationResult or None
        What the last run gave (evaluation, state file, best iteration...).
    """

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self._init_lifecycle()
        napari_viewer = unwrap_viewer(napari_viewer)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.adapt_config = AdaptConfig()
        self.data_config = DataConfig()
        self.folder_config = FolderConfig()
        self.job: Job | None = None
        self.adapted_model = None
        self.result = None
        self.records: list = []  # StepRecords (best_iteration: the run's best so far)
        self._warnings: list[str] = []  # the run's warnings (worker thread), shown at the end
        self.worker_iteration = 0  # last iteration the background worker finished
        self._previous: tuple | None = None  # (model or None, name, state_dict copy)
        self._kept = False
        self._last_draw = 0.0
        self._resume_note = ""

        self.layer_box = LayerTargetsBox(napari_viewer)
        self.fixed_combo, self.moving_combo = (
            self.layer_box.fixed_combo,
            self.layer_box.moving_combo,
        )
        self.source_combo = target_source_combo()
        self.folder_box = FolderTargetsBox()
        self.folder_box.setVisible(False)
        settings = self._settings_box()  # created in the order they are laid out
        self.state_box = StateBox()

        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("Adapt a copy of the current model (in the background)")
        self.this_pair_button = QPushButton("Adapt to the registered pair")
        self.this_pair_button.setToolTip(
            "One click: adapt a copy of the current model to the pair the Register widget "
            "registered last (after its pre-alignment, in overlapping tiles; no labels), "
            "then Re-register to compare"
        )
        job_controls(self)
        self.job_title = "the adaptation"
        self.stop_button.setToolTip(
            "Stop within one pass: the best weights so far (by the keep-best criterion) are kept"
        )
        self.plot = AdaptationPlot(napari_viewer)
        self._result_buttons()

        layout, footer = scrolled_layout(self)
        layout.addLayout(row(QLabel("Target source"), self.source_combo))
        layout.addWidget(self.layer_box)
        layout.addWidget(self.folder_box)
        layout.addWidget(settings)
        layout.addWidget(self.state_box)
        layout.addWidget(self.plot, 1)
        # the run's controls and what to do with its result are always reachable
        footer.addLayout(row(self.start_button, self.stop_button))
        footer.addWidget(self.this_pair_button)
        footer.addWidget(self.progress)
        footer.addWidget(self.status_label)
        footer.addLayout(row(self.keep_button, self.revert_button))
        footer.addLayout(row(self.save_button, self.reregister_button))

        self._connect()
        tabbed_panel(self)

    # ------------------------------------------------------------------ parts
    def _settings_box(self) -> QGroupBox:
        """Method, discrepancy, steps and learning rate."""
        self.method_combo = QComboBox()
        for key, text in METHOD_LABELS.items():
            self.method_combo.addItem(text, key)
        self.method_combo.setToolTip(
            "Self-training (default): the heads learn the model's own fields refined by "
            "MIND-SSC instance optimisation; the most accurate after a short run "
            "(docs/benchmarks.md). MCD: the paper's maximum classifier discrepancy."
        )
        self.discrepancy_combo = QComboBox()
        for key, text in DISCREPANCIES.items():
            self.discrepancy_combo.addItem(text, key)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100000)
        self.steps_spin.setValue(self.adapt_config.steps)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1e-2)
        self.lr_spin.setSingleStep(1e-5)
        self.lr_spin.setValue(self.adapt_config.lr)
        self.discrepancy_combo.setToolTip(
            "How the two heads' disagreement on the target pairs is measured (pEMD: the "
            "paper's projected Earth Mover's discrepancy)"
        )
        self.steps_spin.setToolTip(
            "Adaptation iterations (self-training: one Adam step of the heads; MCD: its "
            "steps A, B and C)"
        )
        self.lr_spin.setToolTip("Adam learning rate of the adaptation")

        settings = QGroupBox("Settings")
        sform = QFormLayout(settings)
        sform.addRow("Method", self.method_combo)
        sform.addRow("Discrepancy", self.discrepancy_combo)
        sform.addRow("Steps", self.steps_spin)
        sform.addRow("Learning rate", self.lr_spin)
        return settings

    def _result_buttons(self) -> None:
        """What to do with a run's result: keep, revert, save, re-register (enabled
        once there is one)."""
        self.keep_button = QPushButton("Keep")
        self.keep_button.setToolTip("Use the adapted model for registration from now on")
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip(
            "Go back to the model (and exact weights) used before adapting"
        )
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Write the adapted model to a .safetensors checkpoint")
        self.reregister_button = QPushButton("Re-register")
        self.reregister_button.setToolTip(
            "Register again (Register widget settings) with the adapted model"
        )
        for b in (self.keep_button, self.revert_button, self.save_button, self.reregister_button):
            b.setEnabled(False)

    def _connect(self) -> None:
        """Wire the controls (lambdas: Qt's ``checked`` arguments never reach the methods)."""
        self.source_combo.currentIndexChanged.connect(lambda *_: self._show_source())
        self.method_combo.currentIndexChanged.connect(lambda *_: self._method_changed())
        self.discrepancy_combo.setEnabled(self.method() == "mcd")
        self.start_button.clicked.connect(lambda *_: self.start())
        self.this_pair_button.clicked.connect(lambda *_: self.adapt_to_registered_pair())
        self.state_box.resume_button.clicked.connect(lambda *_: self._resume_dialog())
        self.stop_button.clicked.connect(lambda *_: self.stop())
        self.keep_button.clicked.connect(lambda *_: self.keep())
        self.revert_button.clicked.connect(lambda *_: self.revert())
        self.save_button.clicked.connect(lambda *_: self._save_dialog())
        self.reregister_button.clicked.connect(lambda *_: self.reregister())

    # ------------------------------------------------------------------ inputs
    def method(self) -> str:
        """The adaptation method: ``"self-training"`` (default) or ``"mcd"``."""
        return str(self.method_combo.currentData())

    def set_method(self, key: str) -> None:
        select_data(self.method_combo, key, "adaptation method", METHOD_LABELS)

    def _method_changed(self) -> None:
        """The method's own defaults in Steps and Learning rate; the discrepancy is MCD's."""
        defaults = AdaptConfig.for_method(self.method())
        self.steps_spin.setValue(defaults.steps)
        self.lr_spin.setValue(defaults.lr)
        self.discrepancy_combo.setEnabled(self.method() == "mcd")

    def discrepancy(self) -> str:
        return self.discrepancy_combo.currentData()

    def set_discrepancy(self, key: str) -> None:
        select_data(self.discrepancy_combo, key, "discrepancy", DISCREPANCIES)

    def target_source(self) -> str:
        """Where the target pairs come from: ``"layers"``, ``"registered"`` or ``"folders"``."""
        return self.source_combo.currentData()

    def set_target_source(self, key: str) -> None:
        index = self.source_combo.findData(key)
        if index < 0:
            raise ValueError(f"target source must be one of {tuple(TARGET_SOURCES)}, got {key!r}")
        self.source_combo.setCurrentIndex(index)
        self._show_source()

    def _show_source(self) -> None:
        source = self.target_source()
        self.layer_box.setVisible(source == "layers")
        self.folder_box.setVisible(source == "folders")

    # ------------------------------------------------------------------ run
    @property
    def is_running(self) -> bool:
        return self.job is not None and self.job.is_running

    def _spec(self, model, resume=None, saved: dict[str, Any] | None = None) -> AdaptationSpec:
        """The resolved spec of the run the form describes (``ValueError`` for bad input);
        ``saved``: the settings of the run ``resume`` continues, used as they are."""
        folder_config = self.folder_config
        if saved is not None and not array_run(saved):
            targets = None  # the saved run's folders or files
        elif self.target_source() == "folders":
            targets = self.folder_box.targets()
            folder_config = self.folder_box.folder_config(folder_config)
        elif self.target_source() == "registered":
            targets = registered_targets(self.state.run)
        else:
            targets = self.layer_box.targets()
        steps = int(self.steps_spin.value())
        config = replace(
            self.adapt_config, method=self.method(), steps=steps, lr=float(self.lr_spin.value())
        )
        data_config, discrepancy = self.data_config, self.discrepancy()
        if saved is not None:  # exactly the saved values (the spin boxes round them)
            config, data_config, discrepancy = saved_configs(config, data_config, saved)
        spec = AdaptationSpec(
            targets=targets,
            model=None if resume else model,
            discrepancy=discrepancy,
            config=config,
            data_config=data_config,
            folder_config=folder_config,
            steps=steps,
            device=self.state.device,
            checkpoint_every=self.state_box.every(),
            state_path=self.state_box.state_path(resuming=resume is not None),
            resume=resume,
            log=_notify.logger.info,
            warn=self._warnings.append,
        )
        return resolve_adaptation(spec)

    def start(self) -> Job | None:
        """Adapt a copy of the current model in a background thread (returns the job)."""
        return self._start()

    def adapt_to_registered_pair(self) -> Job | None:
        """One click: adapt to the pair the Register widget registered last (its tiles
        after the pre-alignment), with the form's method and settings."""
        self.set_target_source("registered")
        return self._start()

    def resume(self, path) -> Job | None:
        """Continue the run saved in the state file ``path``: its model, targets (layers
        again for a run on layers) and settings, to its total iterations or to Steps
        when that is larger; the form shows the saved settings."""
        if self.is_running:
            _notify.warning("adaptation is already running")
            return None
        try:
            saved, done = saved_run(path)
            self.set_method(saved.get("method", "mcd"))
            self.set_discrepancy(saved["discrepancy"])
        except _notify.USER_ERRORS as exc:
            self._refuse(_notify.describe(exc))
            return None
        self.lr_spin.setValue(float(saved["lr"]))
        self.steps_spin.setValue(max(int(saved.get("steps", 0)), int(self.steps_spin.value())))
        if array_run(saved):
            self.set_target_source("layers")
        elif saved.get("target") and saved.get("target_moving"):
            self.set_target_source("folders")
            self.folder_box.show_saved(saved)
        self._resume_note = f"resuming {path} after iteration {done}…"
        return self._start(resume=Path(path), saved=saved)

    def _resume_dialog(self) -> None:
        path = self.state_box.choose_resume()
        if path:
            self.resume(path)

    def _start(self, resume=None, saved=None) -> Job | None:
        if self.is_running:
            _notify.warning("adaptation is already running")
            return None
        if self.adapted_model is not None and not self._kept:
            self.adapted_model = None  # an unkept earlier result is discarded by a new run
        self._warnings = []
        try:
            spec = self._spec(None, resume, saved)  # the model: in the worker (below)
        except _notify.USER_ERRORS as exc:
            self._refuse(_notify.describe(exc))
            return None
        current, current_name, device = self.state.model, self.state.model_name, self.state.device
        self._previous = None
        self._kept = False
        self.result = None
        self.records = []
        self.worker_iteration = 0
        self.plot.reset(DISPLAY_NAMES.get(spec.kind, spec.kind.value), spec.config.method)
        self.progress.setRange(0, spec.config.steps)
        self.progress.setValue(0)
        note = self._resume_note if resume is not None else "preparing the targets and the model…"
        self.status_label.setText(note)
        self.show_plot()

        def body(stop: threading.Event):
            # loading the shipped model and copying its weights take 0.1-0.3 s: not on
            # the GUI thread. Revert goes back to exactly these weights.
            base = self.state.resolve_model(device)
            self._previous = (
                current,
                current_name,
                snapshot_weights(base),
            )
            run_spec = spec if resume is not None else replace(spec, model=base)
            # stop checked between the passes inside an iteration: Stop answers in one pass
            run = run_adaptation(replace(run_spec, should_stop=stop.is_set))  # in this thread
            try:
                for progress in run:
                    # the worker's own count: records reach the GUI thread later, via signals
                    self.worker_iteration = progress.iteration
                    yield progress
                    if stop.is_set():
                        break
            finally:
                run.close()  # after a complete iteration: best weights, state saved if asked
            return run.result

        self._set_running(True)
        self.job = Job(
            body,
            context="adaptation",
            on_yield=self._on_record,
            on_return=self._on_done,
            on_failure=lambda exc: self.status_label.setText(f"failed: {_notify.describe(exc)}"),
            on_finish=lambda: self._set_running(False),
        ).start()
        return self.job

    def _refuse(self, message: str) -> None:
        """A run that does not start: the reason as an error and in the status line (never
        the text of an earlier run)."""
        _notify.error(message)
        self.status_label.setText(f"not started: {message}")

    def show_plot(self) -> None:
        """Scroll the form so that the live plot is in view (above the run's controls,
        which stay below the scroll area): what a run is watched on."""
        self.scroll_area.ensureWidgetVisible(self.plot, 0, 0)

    def stop(self) -> None:
        """Stop within one pass of the iteration in progress: that iteration is undone,
        the last complete one is scored by the keep-best criterion, the best is kept."""
        if self.job is not None and self.job.is_running:
            self.job.request_stop()
            self.status_label.setText("stopping…")

    def _on_record(self, progress) -> None:
        record = replace(progress.record, best_iteration=progress.best_iteration)
        self.records.append(record)
        if len(self.records) == 1:  # the status line has grown since the start
            self.show_plot()
        self.plot.add(record)
        if self.progress.maximum() != record.total:
            self.progress.setRange(0, record.total)
        self.progress.setValue(record.iteration)
        parts = [f"iteration {record.iteration}/{record.total}"]
        if "source_ce" in record.losses:
            parts.append(f"source CE {record.losses['source_ce']:.3f}")
        if "pseudo_label_ce" in record.losses:
            parts.append(f"pseudo-label CE {record.losses['pseudo_label_ce']:.3f}")
        if record.discrepancy is not None:
            parts.append(f"target discrepancy {record.discrepancy:.4f}")
        parts.append(f"best iteration {record.best_iteration}")
        if not (self.job is not None and self.job.stop_event.is_set()):
            self.status_label.setText(", ".join(parts))
        now = time.monotonic()
        if now - self._last_draw > 0.3 or record.iteration >= record.total:
            self._last_draw = now
            self.plot.update_data()

    def _on_done(self, result) -> None:
        if self._warnings:
            _notify.warning(warnings_text(self._warnings))
        self.plot.update_data()
        if result is not None:  # None: closed before its first iteration
            self.result = result
            # a run that kept its starting weights has nothing to offer as "adapted"
            self.adapted_model = None if unchanged(result) else result.model
        self.status_label.setText(result_text(result))

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.this_pair_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        done = not running and self.adapted_model is not None
        for b in (self.keep_button, self.save_button, self.reregister_button):
            b.setEnabled(done)
        self.revert_button.setEnabled(not running and self._previous is not None)

    # ------------------------------------------------------------------ afterwards
    def _adapted_name(self) -> str:
        best = self.result.best_iteration if self.result is not None else 0
        kind = self.result.metadata["adaptation"]["discrepancy"] if self.result else "pemd"
        return f"adapted ({DISPLAY_NAMES.get(Discrepancy(kind), kind)}, iteration {best})"

    def keep(self) -> bool:
        """Make the adapted model the current model (the Register widget uses it)."""
        if self.adapted_model is None or self.is_running:
            _notify.warning("run an adaptation to the end (or stop it) first")
            return False
        self.state.set_model(self.adapted_model, self._adapted_name())
        self._kept = True
        self.status_label.setText(f"the current model is now {self.state.model_name}")
        return True

    def revert(self) -> bool:
        """Restore the model used before the last adaptation, with bit-identical weights."""
        if self.is_running:
            _notify.warning("stop the adaptation first")
            return False
        if self._previous is None:
            _notify.warning("there is nothing to revert")
            return False
        model, name, weights = self._previous
        if model is not None:
            model.load_state_dict(weights)
        self.state.set_model(model, name)
        self.adapted_model = None
        self._kept = False
        self._previous = None
        self._set_running(False)
        self.status_label.setText(f"reverted to {name}")
        return True

    def _save_dialog(self) -> None:
        if self.adapted_model is None:
            _notify.error("there is no adapted model to save")
            return
        path, _ = QFileDialog.getSaveFileName(
            self, "Save adapted model", "adapted.safetensors", CHECKPOINT_FILTER
        )
        if path:
            self.save(path)

    def save(self, path):
        """Write the adapted model to a safetensors checkpoint."""
        if self.adapted_model is None:
            _notify.error("there is no adapted model to save")
            return None
        result = self.result
        meta = result.metadata if result is not None else {}
        run = meta.get("adaptation", {})
        extra = {  # the run's record (as the command line saves it) and a short summary
            **meta,
            "adapted_with": run.get("discrepancy", self.discrepancy()),
            "iterations": result.completed_steps if result else 0,
            "best_iteration": result.best_iteration if result else 0,
            "lr": run.get("config", {}).get("lr", float(self.lr_spin.value())),
        }
        try:
            out = napari_discreg.save_model(self.adapted_model, path, extra=extra)
        except _notify.USER_ERRORS as exc:
            message = f"cannot save the model: {_notify.describe(exc)}"
            _notify.error(message)
            self.status_label.setText(message)
            return None
        self.status_label.setText(f"saved the adapted model to {out}")
        return out

    def reregister(self):
        """Register again with the adapted model, using the Register widget's choices."""
        widget = self.state.register_widget
        if widget is None:
            _notify.warning("open the Register widget to choose the images to register")
            return None
        if self.adapted_model is None:
            _notify.warning("there is no adapted model yet")
            return None
        return widget.run(model=self.adapted_model, model_name=self._adapted_name())

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Stop a running adaptation and wait for its thread (called on close)."""
        if self.job is not None and self.job.is_running:
            self.job.stop_and_wait()

    def closeEvent(self, event):  # noqa: N802 - Qt API
        self.shutdown()
        self.fixed_combo.disconnect_viewer()
        self.moving_combo.disconnect_viewer()
        self.plot.disconnect_viewer()
        QWidget.closeEvent(self, event)
