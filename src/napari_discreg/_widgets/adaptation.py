"""Adaptation widget: adapt the current model to the contrast of some target pairs.

*Start* clones the current model and runs :func:`napari_discreg.adapt_steps` on the
clone in a background thread; every iteration updates the progress bar and the live
plot (source cross-entropy, target discrepancy, and the unsupervised selection
criterion whenever it is evaluated). *Stop* ends it after the iteration in progress;
the clone then holds the best weights by the criterion (``adapt_steps`` restores
them). Afterwards: *Keep* makes the adapted model the current one (the Register
widget uses it), *Revert* restores the previous model with its exact weights,
*Save…* writes the adapted model, *Re-register* registers again with it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

# ``adapt_steps`` and ``save_model`` are looked up in the package's public API when used
import napari_discreg

from ..core.config import AdaptConfig, DataConfig
from ..core.discrepancy import DISPLAY_NAMES, Discrepancy
from ..core.model import clone_model
from . import _notify
from ._adaptation_plot import AdaptationPlot
from ._io import CHECKPOINT_FILTER
from ._layers import check_image_pair
from ._pickers import LayerCombo, preferring
from ._qt import OUTPUT_WORDS, row
from ._state import state_for, unwrap_viewer
from ._workers import Job, WorkerWidgetMixin, job_controls

_LABELS = {
    Discrepancy.PEMD: "pEMD (projected Earth Mover's)",
    Discrepancy.PEMD16_SWD: "pEMD 16+ (16 directions + SWD, the paper's best)",
    Discrepancy.PEMD16: "pEMD 16 (16 projection directions)",
    Discrepancy.SWD: "SWD (sliced Wasserstein)",
    Discrepancy.L1: "L1 (MCD)",
}
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
    adapted_model : DiscreteRegistrationNet or None
        The adapted clone after a run.
    """

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self._init_lifecycle()
        napari_viewer = unwrap_viewer(napari_viewer)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.adapt_config = AdaptConfig()
        self.data_config = DataConfig()
        self.job: Job | None = None
        self.adapted_model = None
        self.records: list = []
        self.worker_iteration = 0  # last iteration the background worker finished
        self._previous: tuple | None = None  # (model or None, name, state_dict copy)
        self._kept = False
        self._last_draw = 0.0

        avoid = OUTPUT_WORDS
        self.fixed_combo = LayerCombo(
            napari_viewer, (Image,), prefer=preferring("target fixed", "fixed", avoid=avoid, ndim=3)
        )
        self.moving_combo = LayerCombo(
            napari_viewer,
            (Image,),
            prefer=preferring(
                "target moving",
                "moving",
                avoid=avoid,
                ndim=3,
                exclude=lambda layer: layer is self.fixed_combo.layer(),
            ),
        )
        self.moving_combo.select_preferred()
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

        target = QGroupBox("Target pairs (unlabelled)")
        form = QFormLayout(target)
        form.addRow("Fixed", self.fixed_combo)
        form.addRow("Moving", self.moving_combo)
        form.setWidget(
            2,
            QFormLayout.ItemRole.SpanningRole,
            QLabel("3D layers: one pair per slice along axis 0"),
        )
        settings = QGroupBox("Settings")
        sform = QFormLayout(settings)
        sform.addRow("Discrepancy", self.discrepancy_combo)
        sform.addRow("Steps", self.steps_spin)
        sform.addRow("Learning rate", self.lr_spin)

        self.start_button = QPushButton("Start")
        job_controls(self)
        self.plot = AdaptationPlot(napari_viewer)
        self.keep_button = QPushButton("Keep")
        self.keep_button.setToolTip("Use the adapted model for registration from now on")
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip(
            "Go back to the model (and exact weights) used before adapting"
        )
        self.save_button = QPushButton("Save…")
        self.reregister_button = QPushButton("Re-register")
        self.reregister_button.setToolTip(
            "Register again (Register widget settings) with the adapted model"
        )
        for b in (self.keep_button, self.revert_button, self.save_button, self.reregister_button):
            b.setEnabled(False)

        layout = QVBoxLayout(self)
        layout.addWidget(target)
        layout.addWidget(settings)
        layout.addLayout(row(self.start_button, self.stop_button))
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addWidget(self.plot, 1)
        layout.addLayout(row(self.keep_button, self.revert_button))
        layout.addLayout(row(self.save_button, self.reregister_button))

        self.start_button.clicked.connect(lambda *_: self.start())
        self.stop_button.clicked.connect(lambda *_: self.stop())
        self.keep_button.clicked.connect(lambda *_: self.keep())
        self.revert_button.clicked.connect(lambda *_: self.revert())
        self.save_button.clicked.connect(lambda *_: self._save_dialog())
        self.reregister_button.clicked.connect(lambda *_: self.reregister())

    # ------------------------------------------------------------------ inputs
    def discrepancy(self) -> str:
        return self.discrepancy_combo.currentData()

    def set_discrepancy(self, key: str) -> None:
        index = self.discrepancy_combo.findData(key)
        if index < 0:
            raise ValueError(f"discrepancy must be one of {tuple(DISCREPANCIES)}, got {key!r}")
        self.discrepancy_combo.setCurrentIndex(index)

    def _targets(self) -> tuple[np.ndarray, np.ndarray]:
        fixed, moving = self.fixed_combo.layer(), self.moving_combo.layer()
        check_image_pair(
            fixed,
            moving,
            what="target ",
            missing="choose the fixed and moving target image layers (2D pairs or 3D stacks)",
        )
        f, m = np.asarray(fixed.data), np.asarray(moving.data)
        return (f[None], m[None]) if f.ndim == 2 else (f, m)

    # ------------------------------------------------------------------ run
    @property
    def is_running(self) -> bool:
        return self.job is not None and self.job.is_running

    def start(self) -> Job | None:
        """Adapt a clone of the current model in a background thread (returns the job)."""
        adapt_steps = napari_discreg.adapt_steps
        if self.is_running:
            _notify.warning("adaptation is already running")
            return None
        if self.adapted_model is not None and not self._kept:
            self.adapted_model = None  # an unkept earlier result is discarded by a new run
        try:
            fixed, moving = self._targets()
            base = self.state.resolve_model(self.state.device)
        except _notify.USER_ERRORS as exc:
            _notify.error(_notify.describe(exc))
            return None
        self._previous = (
            self.state.model,
            self.state.model_name,
            {k: v.detach().clone() for k, v in base.state_dict().items()},
        )
        self._kept = False
        clone = clone_model(base)
        kind = self.discrepancy()
        config = replace(
            self.adapt_config, steps=int(self.steps_spin.value()), lr=float(self.lr_spin.value())
        )
        data_config = self.data_config
        device = self.state.device
        self.records = []
        self.worker_iteration = 0
        self.plot.reset(DISPLAY_NAMES.get(Discrepancy(kind), kind))
        self.progress.setRange(0, config.steps)
        self.progress.setValue(0)
        self.status_label.setText("preparing…")

        def body(stop: threading.Event):
            gen = adapt_steps(
                clone,
                fixed,
                moving,
                discrepancy=kind,
                config=config,
                data_config=data_config,
                device=device,
            )
            try:
                for record in gen:
                    # the worker's own count: records reach the GUI thread later, via signals
                    self.worker_iteration = record.iteration
                    yield record
                    if stop.is_set():
                        break
            finally:
                gen.close()  # restores the best weights into the clone
            return clone

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

    def stop(self) -> None:
        """Stop after the iteration in progress (the best weights so far are kept)."""
        if self.job is not None and self.job.is_running:
            self.job.request_stop()
            self.status_label.setText("stopping after this iteration…")

    def _on_record(self, record) -> None:
        self.records.append(record)
        self.plot.add(record)
        self.progress.setValue(record.iteration)
        parts = [f"iteration {record.iteration}/{record.total}"]
        if record.losses:
            parts.append(f"source CE {record.losses.get('source_ce', float('nan')):.3f}")
        if record.discrepancy is not None:
            parts.append(f"target discrepancy {record.discrepancy:.4f}")
        if record.best_iteration is not None:
            parts.append(f"best iteration {record.best_iteration}")
        if not (self.job is not None and self.job.stop_event.is_set()):
            self.status_label.setText(", ".join(parts))
        now = time.monotonic()
        if now - self._last_draw > 0.3 or record.iteration >= record.total:
            self._last_draw = now
            self.plot.refresh()

    def _on_done(self, model) -> None:
        self.adapted_model = model
        self.plot.refresh()
        last = self.records[-1] if self.records else None
        best = last.best_iteration if last is not None else 0
        stopped = last is not None and last.iteration < last.total
        self.status_label.setText(
            f"{'stopped' if stopped else 'finished'} after {last.iteration if last else 0} iterations; "
            f"the model holds the weights of iteration {best} (best selection criterion). "
            "Keep, Revert, Save or Re-register."
        )

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        done = not running and self.adapted_model is not None
        for b in (self.keep_button, self.save_button, self.reregister_button):
            b.setEnabled(done)
        self.revert_button.setEnabled(not running and self._previous is not None)

    # ------------------------------------------------------------------ afterwards
    def _adapted_name(self) -> str:
        last = self.records[-1] if self.records else None
        best = last.best_iteration if last is not None else 0
        kind = self.discrepancy()
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
        last = self.records[-1] if self.records else None
        extra = {
            "adapted_with": self.discrepancy(),
            "iterations": last.iteration if last else 0,
            "best_iteration": last.best_iteration if last else 0,
            "lr": float(self.lr_spin.value()),
        }
        try:
            out = napari_discreg.save_model(self.adapted_model, path, extra=extra)
        except _notify.USER_ERRORS as exc:
            _notify.error(f"cannot save the model: {_notify.describe(exc)}")
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
