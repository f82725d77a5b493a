"""The Register widget's model group: which model (shipped or a checkpoint), device, method.

The chosen model goes to :attr:`SessionState.model` and the device to
:attr:`SessionState.device`, where every widget of the viewer finds them.
"""

from __future__ import annotations

import torch
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
)

from ..core.config import SHIPPED_MODELS, RefineConfig
from ..core.files.checkpoint import load_model, shipped_model_path
from ..core.registration.methods import DEFAULT_METHOD, METHODS
from . import _notify
from ._io import CHECKPOINT_FILTER, layer_name_for
from ._qt import row, select_data
from ._state import SHIPPED_MODEL_NAME, SessionState

DEVICES = ("auto", "cpu", "cuda")


class ModelBox(QGroupBox):
    """Model source (the shipped models by name, or a checkpoint file), device, refinement."""

    def __init__(self, state: SessionState, parent=None) -> None:
        super().__init__("Model", parent)
        self.state = state
        form = QFormLayout(self)
        self.model_combo = QComboBox()
        # the shipped models by name (default first), then a checkpoint file
        for name, (_, description) in SHIPPED_MODELS.items():
            if name == "default" or shipped_model_path(name).is_file():
                self.model_combo.addItem(
                    SHIPPED_MODEL_NAME if name == "default" else f"shipped: {name}", name
                )
                self.model_combo.setItemData(
                    self.model_combo.count() - 1, description, Qt.ItemDataRole.ToolTipRole
                )
        self.model_combo.addItem("checkpoint file", None)
        self.model_combo.setToolTip(
            "The network: a model shipped with the plugin (default: trained with contrast "
            "augmentation; mono: the paper's mono-modal source model) or a checkpoint file"
        )
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path/to/model.safetensors")
        self.browse_checkpoint_button = QPushButton("Browse…")
        self.browse_checkpoint_button.setToolTip("Choose a .safetensors checkpoint")
        self.checkpoint_edit.setToolTip("A napari-discreg .safetensors checkpoint")
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.setToolTip(
            "Where registration and adaptation run: auto (CUDA when available), cpu or cuda"
        )
        if not torch.cuda.is_available():
            self.device_combo.model().item(DEVICES.index("cuda")).setEnabled(False)
        self._show_device(state.device)
        form.addRow("Source", self.model_combo)
        form.addRow("Checkpoint", row(self.checkpoint_edit, self.browse_checkpoint_button))
        form.addRow("In use", self.model_label)
        form.addRow("Device", self.device_combo)

        # the same methods, default first, as register() and the command line
        self.method_combo = QComboBox()
        for name, method in METHODS.items():
            label = f"{name} (default)" if name == DEFAULT_METHOD else name
            self.method_combo.addItem(label, name)
            self.method_combo.setItemData(
                self.method_combo.count() - 1, method.description, Qt.ItemDataRole.ToolTipRole
            )
        self.method_combo.setCurrentIndex(list(METHODS).index(DEFAULT_METHOD))
        self.method_combo.setToolTip(
            "How the field is made after the pre-alignment. network (default): the "
            "network's field, coarse to fine, the most accurate on real stain pairs "
            "(docs/benchmarks.md, 'Real landmarks'); bspline: B-spline Gauss-Newton over "
            "MIND-SSC descriptors; none: the pre-alignment alone. The inspector shows the "
            "network's histograms whatever the method."
        )
        self.adam_steps_spin = QSpinBox()
        self.adam_steps_spin.setRange(1, 2000)
        self.adam_steps_spin.setValue(RefineConfig().steps)
        self.adam_steps_spin.setToolTip("Adam steps per level of the network+adam method")
        self.method_combo.currentIndexChanged.connect(lambda *_: self._method_changed())
        self._method_changed()
        # rows of their own: beside the method combo a docked panel clipped the spin box's
        # words ("50 Adam st")
        form.addRow("Method", self.method_combo)
        form.addRow("Adam steps", self.adam_steps_spin)

        # lambdas: Qt's ``checked``/index arguments never reach the methods
        self.model_combo.currentIndexChanged.connect(lambda *_: self._source_changed())
        self.browse_checkpoint_button.clicked.connect(lambda *_: self._browse_checkpoint())
        self.checkpoint_edit.returnPressed.connect(
            lambda: self.load_checkpoint(self.checkpoint_edit.text())
        )
        self.device_combo.currentTextChanged.connect(self._device_chosen)
        state.device_changed.connect(self._show_device)
        state.model_changed.connect(self._model_changed)
        self._model_changed(state.model_name)

    # ------------------------------------------------------------------ device
    def device(self) -> str | None:
        """The chosen device (``None``: auto), as :attr:`SessionState.device` holds it."""
        return self.state.device

    def _device_chosen(self, text: str) -> None:
        self.state.device = text

    def _show_device(self, device: str | None) -> None:
        self.device_combo.blockSignals(True)
        self.device_combo.setCurrentText(device or "auto")
        self.device_combo.blockSignals(False)

    # ------------------------------------------------------------------ method
    def method(self) -> str:
        """The chosen registration method (a key of ``METHODS``)."""
        return str(self.method_combo.currentData())

    def set_method(self, name: str) -> None:
        """Choose the registration method ``name`` (a key of ``METHODS``)."""
        select_data(self.method_combo, name, "method", METHODS)

    def refine_settings(self) -> RefineConfig | None:
        """Settings for ``register(refine=...)``: the Adam steps of network+adam, else None."""
        if METHODS[self.method()].settings_type is RefineConfig:
            return RefineConfig(steps=self.adam_steps_spin.value())
        return None

    def _method_changed(self) -> None:
        self.adam_steps_spin.setEnabled(METHODS[self.method()].settings_type is RefineConfig)

    # ------------------------------------------------------------------ model
    def _source_changed(self) -> None:
        name = self.model_combo.currentData()
        if name == "default":
            if self.state.model is not None:
                self.state.set_model(None)
        elif name is not None:
            self.load_shipped(name)
        elif self.checkpoint_edit.text().strip():
            self.load_checkpoint(self.checkpoint_edit.text())

    def load_shipped(self, name: str) -> bool:
        """Make the shipped model ``name`` (a key of ``SHIPPED_MODELS``) current."""
        if name == "default":
            self.state.set_model(None)
            return True
        try:
            model = load_model(name, self.device())
        except _notify.USER_ERRORS as exc:
            _notify.error(f"cannot load the shipped model {name!r}: {_notify.describe(exc)}")
            return False
        self._select_source(name)
        self.state.set_model(model, f"shipped {name}")
        return True

    def _select_source(self, name: str | None) -> None:
        """Show ``name`` (a shipped model, or ``None``: a checkpoint file) in the combo
        without reloading it."""
        self.model_combo.blockSignals(True)
        self.model_combo.setCurrentIndex(self.model_combo.findData(name))
        self.model_combo.blockSignals(False)

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load model checkpoint", "", CHECKPOINT_FILTER)
        if path:
            self.load_checkpoint(path)

    def load_checkpoint(self, path) -> bool:
        """Load a checkpoint file as the current model; errors become notifications."""
        path = str(path).strip()
        try:
            if not path:
                raise ValueError("enter the path of a .safetensors checkpoint")
            model = load_model(path, self.device())
        except _notify.USER_ERRORS as exc:
            _notify.error(f"cannot load the model: {_notify.describe(exc)}")
            return False
        self.checkpoint_edit.setText(path)
        self._select_source(None)
        self.state.set_model(model, f"checkpoint {layer_name_for(path)}")
        return True

    def _model_changed(self, name: str) -> None:
        self.model_label.setText(name)
        if self.state.model is None:
            self._select_source("default")

    def disconnect_state(self) -> None:
        """Stop following the shared state (called when the Register widget closes)."""
        for signal, slot in (
            (self.state.model_changed, self._model_changed),
            (self.state.device_changed, self._show_device),
        ):
            try:
                signal.disconnect(slot)
            except (TypeError, ValueError, RuntimeError):
                pass
