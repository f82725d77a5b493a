"""The Register widget: pick (or open) a fixed and a moving image, register, see the field.

Outputs (added once, then updated in place on every run, never duplicated):

* ``"<moving> warped"`` - the moving image warped onto the fixed one;
* ``"displacement"`` - Vectors from each control point ``x`` to ``x + u(x)``, where the
  fixed pixel ``x`` samples the moving image;
* ``"deformation grid"`` - a regular grid of the moving image warped like the image
  (line segments, see :func:`._geometry.deformation_grid`);
* ``"discrepancy"`` - the projected EMD between the two heads per control point (bins),
  placed with scale/translate so that each value covers its control point's block.

All new layers take the fixed layer's scale and translate. For a 3D fixed layer one
slice along an axis (or every slice) is registered and the outputs are placed at
those slices of the volume.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
from napari.layers import Image, Labels, Points
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.checkpoint import load_model, shipped_model_path
from ..core.config import SHIPPED_MODELS
from . import _notify
from ._geometry import (
    deformation_grid,
    displacement_vectors,
    fixed_to_moving,
    in_plane_axes,
    insert_axis,
    moving_to_fixed,
)
from ._io import (
    CHECKPOINT_FILTER,
    FIELD_FILTER,
    IMAGE_FILTER,
    layer_name_for,
    load_field,
    read_image_file,
    save_field,
)
from ._layers import check_image_pair, upsert_layer
from ._pickers import LayerCombo, preferring
from ._state import SHIPPED_MODEL_NAME, RegistrationRun, state_for, unwrap_viewer
from ._workers import Job, WorkerWidgetMixin, job_controls

WARPED_SUFFIX = " warped"
DISPLACEMENT_LAYER = "displacement"
GRID_LAYER = "deformation grid"
DISCREPANCY_LAYER = "discrepancy"
OUTPUT_WORDS = ("warped", "displacement", "discrepancy", "deformation", "inspected")
DEVICES = ("auto", "cpu", "cuda")
POINTS_FRAMES = {
    "moving": "points on the moving image -> fixed frame",
    "fixed": "points on the fixed image -> moving frame",
}


@dataclass
class _Request:
    fixed: Image
    moving: Image
    axis: int | None
    indices: list[int | None]


class RegisterWidget(WorkerWidgetMixin, QWidget):
    """Register a moving image onto a fixed one with the current model.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self._init_lifecycle()
        napari_viewer = unwrap_viewer(napari_viewer)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.state.register_widget = self
        self.job: Job | None = None
        self._setting_slice = False

        avoid = OUTPUT_WORDS + ("target",)
        self.fixed_combo = LayerCombo(
            napari_viewer, (Image,), prefer=preferring("fixed", avoid=avoid)
        )
        self.moving_combo = LayerCombo(
            napari_viewer,
            (Image,),
            prefer=preferring(
                "moving", avoid=avoid, exclude=lambda layer: layer is self.fixed_combo.layer()
            ),
        )
        # the moving combo's preference depends on the fixed choice: fill it again
        self.moving_combo.select_preferred()
        self.open_fixed_button = QPushButton("Open…")
        self.open_moving_button = QPushButton("Open…")
        self.open_fixed_button.setToolTip("Open a PNG, TIFF, NIfTI or .npy file as the fixed image")
        self.open_moving_button.setToolTip(
            "Open a PNG, TIFF, NIfTI or .npy file as the moving image"
        )

        images = QGroupBox("Images")
        form = QFormLayout(images)
        form.addRow("Fixed", _row(self.fixed_combo, self.open_fixed_button))
        form.addRow("Moving", _row(self.moving_combo, self.open_moving_button))

        # 3D stacks
        self.volume_box = QGroupBox("3D layers: which slice")
        vform = QFormLayout(self.volume_box)
        self.axis_spin = QSpinBox()
        self.axis_spin.setToolTip("Axis of the 3D layers to take 2D slices along")
        self.slice_spin = QSpinBox()
        self.slice_spin.setToolTip("Slice to register (default: the one the viewer shows)")
        self.follow_check = QCheckBox("follow the viewer")
        self.follow_check.setChecked(True)
        self.every_slice_check = QCheckBox("register every slice")
        vform.addRow("Axis", self.axis_spin)
        vform.addRow("Slice", _row(self.slice_spin, self.follow_check))
        vform.addRow("", self.every_slice_check)

        # model
        model_box = QGroupBox("Model")
        mform = QFormLayout(model_box)
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
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path/to/model.safetensors")
        self.browse_checkpoint_button = QPushButton("Browse…")
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        if not _cuda_available():
            self.device_combo.model().item(DEVICES.index("cuda")).setEnabled(False)
        mform.addRow("Source", self.model_combo)
        mform.addRow("Checkpoint", _row(self.checkpoint_edit, self.browse_checkpoint_button))
        mform.addRow("In use", self.model_label)
        mform.addRow("Device", self.device_combo)
        from ..core.config import RefineConfig

        self.refine_check = QCheckBox("refine")
        self.refine_check.setToolTip(
            "After the network, optimise this pair's field directly for a few steps "
            "(MIND-SSC similarity + smoothness, Adam): slower, usually more accurate, "
            "above all where the model is not adapted to these contrasts"
        )
        self.refine_steps_spin = QSpinBox()
        self.refine_steps_spin.setRange(1, 2000)
        self.refine_steps_spin.setValue(RefineConfig().steps)
        self.refine_steps_spin.setSuffix(" steps")
        self.refine_steps_spin.setEnabled(False)
        self.refine_check.toggled.connect(self.refine_steps_spin.setEnabled)
        mform.addRow("Refinement", _row(self.refine_check, self.refine_steps_spin))

        # display options
        out_box = QGroupBox("Display")
        oform = QFormLayout(out_box)
        self.vector_step_spin = QSpinBox()
        self.vector_step_spin.setRange(1, 16)
        self.vector_step_spin.setValue(1)
        self.vector_step_spin.setToolTip("Draw the displacement at every n-th control point")
        self.grid_spacing_spin = QSpinBox()
        self.grid_spacing_spin.setRange(2, 64)
        self.grid_spacing_spin.setValue(8)
        self.grid_spacing_spin.setSuffix(" px")
        oform.addRow("Vectors: every", self.vector_step_spin)
        oform.addRow("Grid spacing", self.grid_spacing_spin)

        self.register_button = QPushButton("Register")
        job_controls(self)

        # apply the field to other layers
        apply_box = QGroupBox("Apply the field to another layer")
        aform = QFormLayout(apply_box)
        self.apply_combo = LayerCombo(
            napari_viewer,
            (Labels, Points),
            prefer=preferring("moving", avoid=OUTPUT_WORDS),
        )
        self.points_frame_combo = QComboBox()
        for key, text in POINTS_FRAMES.items():
            self.points_frame_combo.addItem(text, key)
        self.apply_button = QPushButton("Apply")
        aform.addRow("Layer", self.apply_combo)
        aform.addRow("Points", self.points_frame_combo)
        aform.addRow("", self.apply_button)

        field_box = QGroupBox("Displacement field")
        self.save_field_button = QPushButton("Save field…")
        self.load_field_button = QPushButton("Load field…")
        field_row = QHBoxLayout(field_box)
        field_row.addWidget(self.save_field_button)
        field_row.addWidget(self.load_field_button)

        layout = QVBoxLayout(self)
        for w in (images, self.volume_box, model_box, out_box):
            layout.addWidget(w)
        layout.addLayout(_row(self.register_button, self.stop_button))
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addWidget(apply_box)
        layout.addWidget(field_box)
        layout.addStretch(1)

        # signals (lambdas: Qt's ``checked`` arguments never reach the methods)
        self.fixed_combo.currentIndexChanged.connect(lambda *_: self._update_volume_controls())
        self.axis_spin.valueChanged.connect(lambda *_: self._update_slice_range())
        self.slice_spin.valueChanged.connect(lambda *_: self._slice_edited())
        self.follow_check.toggled.connect(lambda *_: self._follow_viewer())
        self.open_fixed_button.clicked.connect(lambda *_: self._open_image_dialog(self.fixed_combo))
        self.open_moving_button.clicked.connect(
            lambda *_: self._open_image_dialog(self.moving_combo)
        )
        self.model_combo.currentIndexChanged.connect(lambda *_: self._model_source_changed())
        self.browse_checkpoint_button.clicked.connect(lambda *_: self._browse_checkpoint())
        self.checkpoint_edit.returnPressed.connect(
            lambda: self.load_checkpoint(self.checkpoint_edit.text())
        )
        self.register_button.clicked.connect(lambda *_: self.run())
        self.stop_button.clicked.connect(lambda *_: self.stop())
        self.apply_button.clicked.connect(lambda *_: self._apply_clicked())
        self.save_field_button.clicked.connect(lambda *_: self._save_field_dialog())
        self.load_field_button.clicked.connect(lambda *_: self._load_field_dialog())
        self.points_frame_combo.setEnabled(True)
        napari_viewer.dims.events.current_step.connect(self._follow_viewer)
        self.state.model_changed.connect(self._model_changed)
        self._model_changed(self.state.model_name)
        self._update_volume_controls()

    # ------------------------------------------------------------------ inputs
    def _update_volume_controls(self) -> None:
        layer = self.fixed_combo.layer()
        is_3d = layer is not None and layer.ndim == 3 and not getattr(layer, "rgb", False)
        self.volume_box.setVisible(is_3d)
        self.volume_box.setEnabled(is_3d)
        if is_3d:
            self.axis_spin.setRange(0, layer.ndim - 1)
            self._update_slice_range()

    def _update_slice_range(self) -> None:
        layer = self.fixed_combo.layer()
        if layer is None or layer.ndim != 3:
            return
        n = layer.data.shape[self.axis_spin.value()]
        self.slice_spin.setRange(0, max(n - 1, 0))
        self._follow_viewer()

    def viewer_slice(self) -> int | None:
        """The slice of the fixed layer along the chosen axis that the viewer shows now."""
        layer = self.fixed_combo.layer()
        if layer is None or layer.ndim != 3:
            return None
        axis = self.axis_spin.value()
        # ``dims.point`` is the current step in world coordinates; map it into the layer
        coords = layer.world_to_data(self.viewer.dims.point)
        n = layer.data.shape[axis]
        return int(np.clip(np.round(coords[axis]), 0, n - 1))

    def _follow_viewer(self, *_args) -> None:
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

    def _open_image_dialog(self, combo: LayerCombo) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open image", "", IMAGE_FILTER)
        if path:
            self.open_image(path, combo is self.fixed_combo and "fixed" or "moving")

    def open_image(self, path, role: str = "moving"):
        """Read ``path`` (PNG/TIFF/NIfTI/.npy) into a new Image layer and select it as ``role``."""
        try:
            data = read_image_file(path)
        except _notify.USER_ERRORS as exc:
            _notify.error(_notify.describe(exc))
            return None
        layer = self.viewer.add_image(data, name=layer_name_for(path))
        combo = self.fixed_combo if role == "fixed" else self.moving_combo
        combo.set_layer(layer)
        return layer

    def _request(self) -> _Request:
        """Validate the chosen layers and slices (ValueError with a clear message)."""
        fixed, moving = self.fixed_combo.layer(), self.moving_combo.layer()
        check_image_pair(
            fixed,
            moving,
            missing="choose a fixed and a moving image layer (or open image files with 'Open…')",
        )
        if fixed.ndim == 2:
            return _Request(fixed, moving, None, [None])
        axis = self.axis_spin.value()
        n = fixed.data.shape[axis]
        if self.every_slice_check.isChecked():
            indices: list[int | None] = list(range(n))
        else:
            indices = [int(np.clip(self.slice_spin.value(), 0, n - 1))]
        return _Request(fixed, moving, axis, indices)

    # ------------------------------------------------------------------ model
    def device(self) -> str | None:
        text = self.device_combo.currentText()
        return None if text == "auto" else text

    def _model_source_changed(self) -> None:
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

    # ------------------------------------------------------------------ run
    @property
    def is_running(self) -> bool:
        return self.job is not None and self.job.is_running

    def run(self, model=None, model_name: str | None = None) -> Job | None:
        """Register the chosen layers in a background thread (returns the job, or None).

        ``model`` overrides the current model for this run (used by the adaptation
        widget's *Re-register*), ``model_name`` names it in the status line.
        """
        if self.is_running:
            _notify.warning("a registration is already running")
            return None
        try:
            request = self._request()
        except ValueError as exc:
            _notify.error(str(exc))
            return None
        from .. import register

        state = self.state
        device = self.device()
        if model_name is None:
            model_name = state.model_name if model is None else "adapted model"
        fixed_data, moving_data = request.fixed.data, request.moving.data
        axis = request.axis
        refine = self.refine_steps_spin.value() if self.refine_check.isChecked() else 0

        def body(stop: threading.Event):
            # None: the shipped model, loaded once per device and cached by ``register``
            mdl = model if model is not None else state.model
            results = {}
            for k, index in enumerate(request.indices):
                if stop.is_set():
                    break
                if index is None:
                    f, m = np.asarray(fixed_data), np.asarray(moving_data)
                else:
                    f = np.asarray(np.take(fixed_data, index, axis=axis))
                    m = np.asarray(np.take(moving_data, index, axis=axis))
                results[index] = register(f, m, model=mdl, device=device, refine=refine)
                yield k + 1
            return results

        self.progress.setRange(0, len(request.indices))
        self.progress.setValue(0)
        refined = f" + {refine} refinement steps" if refine else ""
        self.status_label.setText(f"registering with {model_name}{refined}…")
        self.register_button.setEnabled(False)
        self.stop_button.setEnabled(len(request.indices) > 1)
        self.job = Job(
            body,
            context="registration",
            on_yield=self.progress.setValue,
            on_return=lambda results: self._registered(request, results, model_name),
            on_failure=lambda exc: self.status_label.setText(f"failed: {_notify.describe(exc)}"),
            on_finish=self._job_finished,
        ).start()
        return self.job

    def stop(self) -> None:
        """Stop a running every-slice registration after the current slice."""
        if self.job is not None:
            self.job.request_stop()

    def _job_finished(self) -> None:
        self.register_button.setEnabled(True)
        self.stop_button.setEnabled(False)

    def _registered(self, request: _Request, results: dict, model_name: str) -> None:
        if not results:
            self.status_label.setText("stopped before the first slice was registered")
            return
        if request.fixed not in self.viewer.layers or request.moving not in self.viewer.layers:
            _notify.warning("the fixed or moving layer was removed during registration")
            return
        fields = {k: r.displacement for k, r in results.items()}
        run = RegistrationRun(
            fields=fields,
            results=dict(results),
            axis=request.axis,
            fixed_layer=weakref.ref(request.fixed),
            moving_layer=weakref.ref(request.moving),
            model_name=model_name,
            warped={k: r.warped for k, r in results.items()},
            stride=next(iter(results.values())).stride,
        )
        self.show_run(run)
        mean_disc = float(np.mean([r.discrepancy.mean() for r in results.values()]))
        steps = next(iter(results.values())).refine_steps
        refined = f", refined ({steps} steps)" if steps else ""
        self.status_label.setText(
            f"registered {len(results)} slice(s) with {model_name}{refined}; mean head "
            f"discrepancy (pEMD) {mean_disc:.3f} bins"
        )

    # ------------------------------------------------------------------ outputs
    def _placement(self, run: RegistrationRun, *, cell: float = 1.0):
        """Scale and translate of a stacked output whose pixels are ``cell`` fixed pixels."""
        fixed = run.layer("fixed")
        scale = np.asarray(fixed.scale, dtype=float).copy()
        translate = np.asarray(fixed.translate, dtype=float).copy()
        plane = in_plane_axes(fixed.ndim, run.axis)
        for a in plane:
            translate[a] += scale[a] * (cell - 1.0) / 2.0
            scale[a] *= cell
        if run.axis is not None:
            translate[run.axis] += min(run.indices) * scale[run.axis]
        return scale, translate

    def _stack(self, run: RegistrationRun, arrays: dict):
        keys = sorted(arrays, key=lambda k: -1 if k is None else k)
        if run.axis is None:
            return arrays[keys[0]]
        return np.stack([arrays[k] for k in keys], axis=run.axis)

    def show_run(self, run: RegistrationRun) -> None:
        """Add or update the output layers of ``run`` and share it with the other widgets."""
        fixed, moving = run.layer("fixed"), run.layer("moving")
        if fixed is None or moving is None:
            raise ValueError("the registered layers no longer exist")
        viewer = self.viewer
        stride = run.stride
        scale, translate = self._placement(run)
        warped_kwargs = {"scale": scale, "translate": translate, "blending": "translucent"}
        if isinstance(moving, Image):
            warped_kwargs["colormap"] = moving.colormap.name
            warped_kwargs["contrast_limits"] = tuple(moving.contrast_limits)
        upsert_layer(
            viewer,
            moving.name + WARPED_SUFFIX,
            "image",
            self._stack(run, run.warped),
            **warped_kwargs,
        )

        fscale = np.asarray(fixed.scale, dtype=float)
        ftranslate = np.asarray(fixed.translate, dtype=float)
        step = self.vector_step_spin.value()
        vectors, segments, residual = [], [], 0.0
        for index, field in run.fields.items():
            v = displacement_vectors(field, stride, step)
            g, res = deformation_grid(field, self.grid_spacing_spin.value())
            residual = max(residual, res)
            vectors.append(_embed_vectors(v, run.axis, index))
            segments.append(_embed_vectors(g, run.axis, index))
        upsert_layer(
            viewer,
            DISPLACEMENT_LAYER,
            "vectors",
            np.concatenate(vectors),
            scale=fscale,
            translate=ftranslate,
            edge_color="yellow",
            edge_width=0.4,
            length=1.0,
            vector_style="arrow",
            metadata={"meaning": "arrow from fixed pixel x to x + u(x) in the moving image"},
        )
        upsert_layer(
            viewer,
            GRID_LAYER,
            "vectors",
            np.concatenate(segments),
            scale=fscale,
            translate=ftranslate,
            edge_color="cyan",
            edge_width=0.3,
            length=1.0,
            vector_style="line",
            opacity=0.8,
            metadata={"meaning": "regular grid of the moving image, warped like the image"},
        )
        if residual > 1.0:
            _notify.warning(
                f"the field is hard to invert (residual {residual:.2f} px): the deformation grid "
                "may be inaccurate where the field folds"
            )
        if run.results:
            disc = {k: r.discrepancy for k, r in run.results.items()}
            dscale, dtranslate = self._placement(run, cell=float(stride))
            hi = max(float(max(d.max() for d in disc.values())), 1e-6)
            upsert_layer(
                viewer,
                DISCREPANCY_LAYER,
                "image",
                self._stack(run, disc),
                scale=dscale,
                translate=dtranslate,
                colormap="magma",
                opacity=0.5,
                blending="translucent",
                contrast_limits=(0.0, hi),
                metadata={
                    "meaning": "projected EMD between heads F1 and F2 per control point (bins)"
                },
            )
        elif DISCREPANCY_LAYER in viewer.layers:
            viewer.layers.remove(DISCREPANCY_LAYER)  # a loaded field has no histograms
        self.state.set_run(run)

    # ------------------------------------------------------------------ apply to layers
    def _apply_clicked(self) -> None:
        layer = self.apply_combo.layer()
        if layer is None:
            _notify.error("choose a Labels or Points layer to apply the field to")
            return
        self.apply_to_layer(layer, points_frame=self.points_frame_combo.currentData())

    def apply_to_layer(self, layer, *, points_frame: str = "moving"):
        """Warp a Labels layer (nearest neighbour) or move a Points layer with the last field.

        Labels must lie on the moving image (same shape); the result overlays the fixed
        image. Points with ``points_frame="moving"`` are positions on the moving image and
        are mapped to the fixed frame by inverting the field (fixed-point iteration);
        with ``"fixed"`` they are positions on the fixed image, mapped to ``x + u(x)`` in
        the moving image. Returns the new layer, or None after an error notification.
        """
        try:
            run = self.state.run
            if run is None:
                raise ValueError("register first (or load a field): there is no field to apply")
            if isinstance(layer, Labels):
                return self._apply_to_labels(run, layer)
            if isinstance(layer, Points):
                return self._apply_to_points(run, layer, points_frame)
            raise ValueError(f"{layer.name!r} is not a Labels or Points layer")
        except ValueError as exc:
            _notify.error(str(exc))
            return None

    def _apply_to_labels(self, run: RegistrationRun, layer: Labels):
        from ..core.warp import warp_numpy

        moving = run.layer("moving")
        if moving is None:
            raise ValueError("the registered moving layer no longer exists")
        data = layer.data
        if tuple(data.shape) != tuple(moving.data.shape):
            raise ValueError(
                f"labels {layer.name!r} {tuple(data.shape)} must have the moving image's shape "
                f"{tuple(moving.data.shape)}"
            )
        warped = {}
        for index, field in run.fields.items():
            sl = np.asarray(data if index is None else np.take(data, index, axis=run.axis))
            warped[index] = warp_numpy(sl, field, order=0)
        scale, translate = self._placement(run)
        return upsert_layer(
            self.viewer,
            layer.name + WARPED_SUFFIX,
            "labels",
            self._stack(run, warped),
            scale=scale,
            translate=translate,
            opacity=layer.opacity,
        )

    def _apply_to_points(self, run: RegistrationRun, layer: Points, frame: str):
        fixed = run.layer("fixed")
        if fixed is None:
            raise ValueError("the registered fixed layer no longer exists")
        if frame not in POINTS_FRAMES:
            raise ValueError(f"points frame must be one of {tuple(POINTS_FRAMES)}, got {frame!r}")
        pts = np.asarray(layer.data, dtype=float)
        if pts.ndim != 2 or pts.shape[1] != fixed.ndim:
            raise ValueError(
                f"points {layer.name!r} have {pts.shape[-1] if pts.ndim == 2 else '?'} coordinates; "
                f"the registered images have {fixed.ndim}"
            )
        # points' data -> world -> fixed data coordinates (scale and translate only)
        world = pts * np.asarray(layer.scale) + np.asarray(layer.translate)
        coords = (world - np.asarray(fixed.translate)) / np.asarray(fixed.scale)
        plane = in_plane_axes(fixed.ndim, run.axis)
        out = coords.copy()
        moved = np.zeros(len(coords), dtype=bool)
        residual = 0.0
        for index, field in run.fields.items():
            if index is None:
                sel = np.ones(len(coords), dtype=bool)
            else:
                sel = np.round(coords[:, run.axis]).astype(int) == index
            if not sel.any():
                continue
            inplane = coords[sel][:, plane]
            if frame == "fixed":
                new = fixed_to_moving(inplane, field)
            else:
                new, res = moving_to_fixed(inplane, field)
                residual = max(residual, res)
            block = out[sel]
            block[:, plane] = new
            out[sel] = block
            moved |= sel
        if not moved.all():
            _notify.warning(
                f"{int((~moved).sum())} point(s) lie on slices that were not registered and "
                "were left where they are"
            )
        if residual > 0.1:
            _notify.warning(
                f"the field could not be inverted exactly at some points ({residual:.2f} px)"
            )
        suffix = WARPED_SUFFIX if frame == "moving" else " in moving frame"
        size = np.asarray(layer.size)
        return upsert_layer(
            self.viewer,
            layer.name + suffix,
            "points",
            out,
            scale=np.asarray(fixed.scale),
            translate=np.asarray(fixed.translate),
            size=float(size.mean()) if size.size else 5.0,
            face_color="magenta" if frame == "moving" else "lime",
            metadata={"frame": "fixed" if frame == "moving" else "moving", "source": layer.name},
        )

    # ------------------------------------------------------------------ fields
    def _save_field_dialog(self) -> None:
        if self.state.run is None:
            _notify.error("register first: there is no field to save")
            return
        path, _ = QFileDialog.getSaveFileName(
            self, "Save displacement field", "displacement.npy", FIELD_FILTER
        )
        if path:
            self.save_field(path)

    def save_field(self, path):
        """Write the last field: ``(2, H, W)`` for one slice, ``(N, 2, H, W)`` for a stack."""
        run = self.state.run
        try:
            if run is None:
                raise ValueError("register first: there is no field to save")
            keys = sorted(run.fields, key=lambda k: -1 if k is None else k)
            arr = run.fields[keys[0]] if len(keys) == 1 else np.stack([run.fields[k] for k in keys])
            out = save_field(path, arr)
        except _notify.USER_ERRORS as exc:
            _notify.error(f"cannot save the field: {_notify.describe(exc)}")
            return None
        self.status_label.setText(f"saved the field to {out}")
        return out

    def _load_field_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load displacement field", "", FIELD_FILTER)
        if path:
            self.load_field(path)

    def load_field(self, path):
        """Read a saved field and warp the chosen moving image with it (no histograms)."""
        from ..core.warp import warp_numpy

        try:
            field = load_field(path)
            request = self._request()
            moving = request.moving
            data = moving.data
            if field.ndim == 4:
                if request.axis is None:
                    raise ValueError(f"a field stack {field.shape} needs 3D fixed/moving layers")
                n = data.shape[request.axis]
                if field.shape[0] != n:
                    raise ValueError(
                        f"the field stack has {field.shape[0]} slices but the layers have {n} "
                        f"along axis {request.axis}"
                    )
                fields = {i: field[i] for i in range(n)}
            else:
                fields = {request.indices[0] if request.axis is not None else None: field}
            warped = {}
            for index, f in fields.items():
                sl = np.asarray(data if index is None else np.take(data, index, axis=request.axis))
                if f.shape[1:] != sl.shape:
                    raise ValueError(
                        f"the field {f.shape} does not fit images of shape {sl.shape}; "
                        "it must be (2, H, W) for (H, W) images"
                    )
                warped[index] = warp_numpy(sl, f, order=1)
        except _notify.USER_ERRORS as exc:
            _notify.error(f"cannot use the field: {_notify.describe(exc)}")
            return None
        model = self.state.model
        run = RegistrationRun(
            fields=fields,
            axis=request.axis,
            fixed_layer=weakref.ref(request.fixed),
            moving_layer=weakref.ref(moving),
            model_name=f"field {layer_name_for(path)}",
            warped=warped,
            stride=model.config.stride if model is not None else 4,
        )
        self.show_run(run)
        self.status_label.setText(f"warped {moving.name!r} with the field from {path}")
        return run

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Stop a running registration and wait for its thread (called on close)."""
        if self.job is not None and self.job.is_running:
            self.job.stop_and_wait()

    def closeEvent(self, event):  # noqa: N802 - Qt API
        self.shutdown()
        for combo in (self.fixed_combo, self.moving_combo, self.apply_combo):
            combo.disconnect_viewer()
        try:
            self.viewer.dims.events.current_step.disconnect(self._follow_viewer)
        except (TypeError, ValueError, RuntimeError):
            pass
        self.state.model_changed.disconnect(self._model_changed)
        if self.state.register_widget is self:
            self.state.register_widget = None
        QWidget.closeEvent(self, event)


def _embed_vectors(vectors: np.ndarray, axis: int | None, index: int | None) -> np.ndarray:
    """(n, 2, 2) in-plane Vectors data -> (n, 2, D) with the slice coordinate inserted."""
    if axis is None:
        return vectors
    start = insert_axis(vectors[:, 0], axis, float(index))
    delta = insert_axis(vectors[:, 1], axis, 0.0)
    return np.stack([start, delta], axis=1)


def _row(*widgets) -> QHBoxLayout:
    row = QHBoxLayout()
    row.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        row.addWidget(w)
    return row


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch import problems
        return False
