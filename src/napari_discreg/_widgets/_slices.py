"""Which slices of 3D layers the Register widget registers, and what it is asked to register."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import QCheckBox, QFormLayout, QGroupBox, QSpinBox

from ._qt import row


@dataclass
class Request:
    """A validated registration request: the layers, the slicing axis and the slices.

    ``axis`` is ``None`` and ``indices`` is ``[None]`` for a 2D pair.
    """

    fixed: Image
    moving: Image
    axis: int | None
    indices: list[int | None]


class SliceBox(QGroupBox):
    """Axis and slice of 3D layers (following the slice the viewer shows), or every slice.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    fixed_layer : callable
        Returns the chosen fixed layer (or None); the box offers that layer's slices.
    """

    def __init__(self, viewer, fixed_layer: Callable, parent=None) -> None:
        super().__init__("3D layers: which slice", parent)
        self._viewer = viewer
        self._fixed_layer = fixed_layer
        self._setting_slice = False
        self.axis_spin = QSpinBox()
        self.axis_spin.setToolTip("Axis of the 3D layers to take 2D slices along")
        self.slice_spin = QSpinBox()
        self.slice_spin.setToolTip("Slice to register (default: the one the viewer shows)")
        self.follow_check = QCheckBox("follow the viewer")
        self.follow_check.setChecked(True)
        self.follow_check.setToolTip("Register the slice the viewer shows (it follows the slider)")
        self.every_slice_check = QCheckBox("register every slice")
        self.every_slice_check.setToolTip(
            "Register every slice of the volume along the axis (Stop keeps the slices done)"
        )
        form = QFormLayout(self)
        form.addRow("Axis", self.axis_spin)
        form.addRow("Slice", row(self.slice_spin, self.follow_check))
        form.addRow("", self.every_slice_check)
        # lambdas: Qt's ``checked``/value arguments never reach the methods
        self.axis_spin.valueChanged.connect(lambda *_: self.update_slice_range())
        self.slice_spin.valueChanged.connect(lambda *_: self._slice_edited())
        self.follow_check.toggled.connect(lambda *_: self.follow_viewer())
        viewer.dims.events.current_step.connect(self.follow_viewer)

    def update_for_layer(self) -> None:
        """Show the box only for a 3D (non-RGB) fixed layer, with its axes and slices."""
        layer = self._fixed_layer()
        is_3d = layer is not None and layer.ndim == 3 and not getattr(layer, "rgb", False)
        self.setVisible(is_3d)
        self.setEnabled(is_3d)
        if is_3d:
            self.axis_spin.setRange(0, layer.ndim - 1)
            self.update_slice_range()

    def update_slice_range(self) -> None:
        layer = self._fixed_layer()
        if layer is None or layer.ndim != 3:
            return
        n = layer.data.shape[self.axis_spin.value()]
        self.slice_spin.setRange(0, max(n - 1, 0))
        self.follow_viewer()

    def viewer_slice(self) -> int | None:
        """The slice of the fixed layer along the chosen axis that the viewer shows now."""
        layer = self._fixed_layer()
        if layer is None or layer.ndim != 3:
            return None
        axis = self.axis_spin.value()
        # ``dims.point`` is the current step in world coordinates; map it into the layer
        coords = layer.world_to_data(self._viewer.dims.point)
        n = layer.data.shape[axis]
        return int(np.clip(np.round(coords[axis]), 0, n - 1))

    def follow_viewer(self, *_args) -> None:
        if not self.follow_check.isChecked():
            return
        index = self.viewer_slice()
        if index is not None and index != self.slice_spin.value():
            self._setting_slice = True
            try:
                self.slice_spin.setValue(index)
            finally:
                self._setting_slice = False

    def _slice_edited(self) -> None:
        if not self._setting_slice and self.follow_check.isChecked():
            if self.slice_spin.value() != self.viewer_slice():
                self.follow_check.setChecked(False)

    def request(self, fixed, moving) -> Request:
        """The slices of a checked fixed/moving pair to register."""
        if fixed.ndim == 2:
            return Request(fixed, moving, None, [None])
        axis = self.axis_spin.value()
        n = fixed.data.shape[axis]
        if self.every_slice_check.isChecked():
            indices: list[int | None] = list(range(n))
        else:
            indices = [int(np.clip(self.slice_spin.value(), 0, n - 1))]
        return Request(fixed, moving, axis, indices)

    def disconnect_viewer(self) -> None:
        try:
            self._viewer.dims.events.current_step.disconnect(self.follow_viewer)
        except (TypeError, ValueError, RuntimeError):
            pass
