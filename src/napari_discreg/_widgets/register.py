"""The Register widget: pick (or open) a fixed and a moving image, register, see the field.

The widget is assembled from parts by concern:

* :mod:`._slices` - which slice(s) of 3D layers to register;
* :mod:`._model_choice` - the model (shipped or a checkpoint), device and refinement;
* :mod:`._register_outputs` - the output layers (warped image, displacement vectors,
  deformation grid, discrepancy map) and the field applied to Labels/Points layers;
* :mod:`._field_files` - saving the last field and warping with a loaded one.

For a 3D fixed layer one slice along an axis (or every slice) is registered and the
outputs are placed at those slices of the volume.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

import numpy as np
from napari.layers import Image, Labels, Points
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..core.files.imagefiles import load_field
from ..core.registration.geometry import in_plane_axes
from ..core.registration.register import method_summary
from ..core.registration.review import gray_image, warp_to_grid
from ..runs.registration import RegistrationSpec, run_registration
from . import _notify
from ._field_files import field_metadata, run_from_field, save_run_field
from ._io import FIELD_FILTER, IMAGE_FILTER, layer_name_for, read_image_file
from ._landmarks import format_tre, matching_landmarks, tre_summary
from ._layers import check_image_pair, warm_up_layer_types
from ._model_choice import ModelBox
from ._pickers import LayerCombo, preferring
from ._qt import OUTPUT_WORDS, row, scrolled_layout, select_data, tabbed_panel
from ._register_outputs import (
    DEFAULT_PREALIGN,
    DEFAULT_REVIEW,
    DETAIL_ROLES,
    DISCREPANCY,
    DISPLACEMENT,
    GRID,
    POINTS_FRAMES,
    PREALIGN_CHOICES,
    REVIEW_MODES,
    HiddenMoving,
    apply_field,
    name_prefix,
    prepare_outputs,
    set_detail_visible,
    set_review_mode,
    show_outputs_steps,
)
from ._slices import Request, SliceBox
from ._state import RegistrationRun, state_for, unwrap_viewer
from ._workers import Job, StopRequested, WorkerWidgetMixin, job_controls


class RegisterWidget(WorkerWidgetMixin, QWidget):
    """Register a moving image onto a fixed one with the current model.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self._init_lifecycle()
        self._running_text = ""
        napari_viewer = unwrap_viewer(napari_viewer)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.state.register_widget = self  # for the adaptation widget's Re-register
        self.job: Job | None = None
        self._landmarks_note = ""
        #: the unregistered moving layer the review view hides (shown again when off)
        self.hidden_moving = HiddenMoving()

        images = self._images_box()
        landmarks_box = self._landmarks_box()
        self.volume_box = SliceBox(napari_viewer, self.fixed_combo.layer)  # 3D stacks
        self.model_box = ModelBox(self.state)  # model, device, method
        out_box = self._display_box()
        self.register_button = QPushButton("Register")
        self.register_button.setToolTip(
            "Register the moving image onto the fixed one (in the background)"
        )
        job_controls(self)
        self.stop_button.setToolTip("Stop the registration (within one optimiser step)")
        self.job_title = "the registration"

        apply_box = self._apply_box()
        field_box = self._field_box()

        layout, footer = scrolled_layout(self)
        for w in (images, landmarks_box, self.volume_box, self.model_box, out_box):
            layout.addWidget(w)
        layout.addWidget(apply_box)
        layout.addWidget(field_box)
        layout.addStretch(1)
        # Register / Stop and the progress stay reachable however short the panel is
        footer.addLayout(row(self.register_button, self.stop_button))
        footer.addWidget(self.progress)
        footer.addWidget(self.status_label)

        self._connect()
        self.points_frame_combo.setEnabled(True)
        self.volume_box.update_for_layer()
        tabbed_panel(self)
        # once the panel is shown: the first Register's layers then add without first costs
        QTimer.singleShot(0, warm_up_layer_types)

    # ------------------------------------------------------------------ parts
    def _images_box(self) -> QGroupBox:
        """Fixed and moving image pickers and the pre-alignment mode."""
        avoid = OUTPUT_WORDS + ("target",)
        self.fixed_combo = LayerCombo(
            self.viewer, (Image,), prefer=preferring("fixed", avoid=avoid)
        )
        self.moving_combo = LayerCombo(
            self.viewer,
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
        self.prealign_combo = QComboBox()
        for key, text in PREALIGN_CHOICES.items():
            self.prealign_combo.addItem(key, key)
            self.prealign_combo.setItemData(
                self.prealign_combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole
            )
        self.prealign_combo.setCurrentIndex(self.prealign_combo.findData(DEFAULT_PREALIGN))
        self.prealign_combo.setToolTip(
            "A global transform found first, across contrasts, then refined by the "
            "deformable method: affine (default: rotation, shift, scale and shear, e.g. two "
            "stained sections), rigid (rotation and shift only) or none (the images are "
            "aligned already, only local motion is left)"
        )
        self.fixed_combo.setToolTip("The image the moving one is aligned to")
        self.moving_combo.setToolTip("The image that is deformed (a different layer)")
        images = QGroupBox("Images")
        form = QFormLayout(images)
        form.addRow("Fixed", row(self.fixed_combo, self.open_fixed_button))
        form.addRow("Moving", row(self.moving_combo, self.open_moving_button))
        form.addRow("Pre-align", self.prealign_combo)
        return images

    def _landmarks_box(self) -> QGroupBox:
        """Optional Points layers of the fixed and the moving image (TRE)."""
        landmarks_box = QGroupBox("Landmarks (optional)")
        lform = QFormLayout(landmarks_box)
        self.fixed_landmarks_combo = LayerCombo(
            self.viewer,
            (Points,),
            allow_none=True,
            prefer=lambda layers: matching_landmarks(self._layer_name(self.fixed_combo), layers),
        )
        self.moving_landmarks_combo = LayerCombo(
            self.viewer,
            (Points,),
            allow_none=True,
            prefer=lambda layers: matching_landmarks(self._layer_name(self.moving_combo), layers),
        )
        self.fixed_landmarks_combo.setToolTip(
            "Points placed on the fixed image (filled in when a Points layer is called "
            "'<fixed image> landmarks'); with moving landmarks, Register reports the target "
            "registration error (TRE) before and after"
        )
        self.moving_landmarks_combo.setToolTip(
            "The corresponding points on the moving image, in the same order (point i "
            "matches point i of the fixed landmarks)"
        )
        lform.addRow("Fixed landmarks", self.fixed_landmarks_combo)
        lform.addRow("Moving landmarks", self.moving_landmarks_combo)
        self._landmarks_images: tuple = (None, None)
        self._sync_landmarks()
        return landmarks_box

    def _display_box(self) -> QGroupBox:
        """The review view and the field's layers (hidden until asked for)."""
        out_box = QGroupBox("Display")
        oform = QFormLayout(out_box)
        self.review_combo = QComboBox()
        for key, text in REVIEW_MODES.items():
            self.review_combo.addItem(key, key)
            self.review_combo.setItemData(
                self.review_combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole
            )
        self.review_combo.setCurrentIndex(self.review_combo.findData(DEFAULT_REVIEW))
        self.review_combo.setToolTip(
            "How to judge the alignment: a checkerboard of the fixed and the warped image "
            "(default: it works across contrasts), the warped image blended over the fixed "
            "one, or their difference. While a review is on, the unregistered moving layer "
            "is hidden; 'off' shows it again"
        )
        self.show_checks = {
            DISPLACEMENT: QCheckBox("arrows"),
            GRID: QCheckBox("grid"),
            DISCREPANCY: QCheckBox("discrepancy"),
        }
        self.show_checks[DISPLACEMENT].setToolTip(
            "Show the displacement arrows (foreground control points): the fixed pixel at "
            "the tail samples the moving image at the head"
        )
        self.show_checks[GRID].setToolTip(
            "Show a regular grid of the moving image, deformed like the image"
        )
        self.show_checks[DISCREPANCY].setToolTip(
            "Show the two heads' disagreement (projected EMD, bins) per control point"
        )
        self.vector_step_spin = QSpinBox()
        self.vector_step_spin.setRange(1, 16)
        self.vector_step_spin.setValue(1)
        self.vector_step_spin.setToolTip("Draw the displacement at every n-th control point")
        self.grid_spacing_spin = QSpinBox()
        self.grid_spacing_spin.setRange(2, 64)
        self.grid_spacing_spin.setValue(8)
        self.grid_spacing_spin.setSuffix(" px")
        self.grid_spacing_spin.setToolTip("Distance between the deformation grid's lines")
        oform.addRow("Review", self.review_combo)
        oform.addRow("Show", row(*self.show_checks.values()))
        oform.addRow("Vectors: every", self.vector_step_spin)
        oform.addRow("Grid spacing", self.grid_spacing_spin)
        return out_box

    def _apply_box(self) -> QGroupBox:
        """Apply the last field to a Labels or Points layer."""
        apply_box = QGroupBox("Apply the field to another layer")
        aform = QFormLayout(apply_box)
        self.apply_combo = LayerCombo(
            self.viewer,
            (Labels, Points),
            prefer=preferring("moving", avoid=OUTPUT_WORDS),
        )
        self.points_frame_combo = QComboBox()
        for key, text in POINTS_FRAMES.items():
            self.points_frame_combo.addItem(text, key)
        self.apply_button = QPushButton("Apply")
        self.apply_combo.setToolTip("A Labels or Points layer drawn on the moving (or fixed) image")
        self.points_frame_combo.setToolTip("Which image the points were placed on")
        self.apply_button.setToolTip("Warp the labels / move the points with the last field")
        aform.addRow("Layer", self.apply_combo)
        aform.addRow("Points", self.points_frame_combo)
        aform.addRow("", self.apply_button)
        return apply_box

    def _field_box(self) -> QGroupBox:
        """Save the last field, or warp with a saved one."""
        field_box = QGroupBox("Displacement field")
        self.save_field_button = QPushButton("Save field…")
        self.load_field_button = QPushButton("Load field…")
        self.save_field_button.setToolTip(
            "Save the last field: .npy/.tif (row, col in pixels) or an ITK displacement "
            "field (.mha/.nii.gz) for ITK, elastix's transformix and ANTs"
        )
        self.load_field_button.setToolTip("Warp the chosen moving image with a saved field")
        field_row = QHBoxLayout(field_box)
        field_row.addWidget(self.save_field_button)
        field_row.addWidget(self.load_field_button)
        return field_box

    def _connect(self) -> None:
        """Wire the controls (lambdas: Qt's ``checked`` arguments never reach the methods)."""
        self.fixed_combo.currentIndexChanged.connect(lambda *_: self.volume_box.update_for_layer())
        for combo in (self.fixed_combo, self.moving_combo):
            combo.currentIndexChanged.connect(lambda *_: self._pair_changed())
            combo.currentIndexChanged.connect(lambda *_: self._sync_landmarks())
        self.open_fixed_button.clicked.connect(lambda *_: self._open_image_dialog(self.fixed_combo))
        self.open_moving_button.clicked.connect(
            lambda *_: self._open_image_dialog(self.moving_combo)
        )
        self.register_button.clicked.connect(lambda *_: self.run())
        self.stop_button.clicked.connect(lambda *_: self.stop())
        self.apply_button.clicked.connect(lambda *_: self._apply_clicked())
        self.save_field_button.clicked.connect(lambda *_: self._save_field_dialog())
        self.load_field_button.clicked.connect(lambda *_: self._load_field_dialog())
        self.review_combo.currentIndexChanged.connect(lambda *_: self._review_changed())
        for role, check in self.show_checks.items():
            check.toggled.connect(lambda shown, role=role: self._detail_toggled(role, shown))

    # ------------------------------------------------------------------ inputs
    def viewer_slice(self) -> int | None:
        """The slice of the fixed layer along the chosen axis that the viewer shows now."""
        return self.volume_box.viewer_slice()

    def _open_image_dialog(self, combo: LayerCombo) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open image", "", IMAGE_FILTER)
        if path:
            self.open_image(path, combo is self.fixed_combo and "fixed" or "moving")

    def open_image(self, path, role: str = "moving"):
        """Read ``path`` (PNG/TIFF/NIfTI/.npy) into a new Image layer and select it as ``role``."""
        try:
            data = read_image_file(path)
        except _notify.USER_ERRORS as exc:
            self._show_error(f"not opened: {_notify.describe(exc)}", _notify.describe(exc))
            return None
        layer = self.viewer.add_image(data, name=layer_name_for(path))
        combo = self.fixed_combo if role == "fixed" else self.moving_combo
        combo.set_layer(layer)
        return layer

    @staticmethod
    def _layer_name(combo: LayerCombo) -> str | None:
        layer = combo.layer()
        return None if layer is None else layer.name

    def _sync_landmarks(self) -> None:
        """Fill the landmark boxes with the images' landmarks when the images change (a
        layer named ``"<image> landmarks"``); a choice made by hand stays otherwise."""
        if not hasattr(self, "fixed_landmarks_combo"):
            return  # still building the widget
        images = (self.fixed_combo.layer(), self.moving_combo.layer())
        if images[0] is not self._landmarks_images[0]:
            self.fixed_landmarks_combo.select_preferred()
        if images[1] is not self._landmarks_images[1]:
            self.moving_landmarks_combo.select_preferred()
        self._landmarks_images = images

    def _landmarks(self, request: Request) -> tuple[dict | None, str]:
        """The chosen landmarks in pixels of their images, for the TRE (read on the GUI
        thread): ``(landmarks or None, a note for the status line when not used)``."""
        fixed_pts = self.fixed_landmarks_combo.layer()
        moving_pts = self.moving_landmarks_combo.layer()
        if fixed_pts is None or moving_pts is None:
            return None, ""
        if request.axis is not None or fixed_pts.ndim != 2 or moving_pts.ndim != 2:
            return None, "landmarks not compared: the TRE needs 2D images and 2D points"
        if len(fixed_pts.data) != len(moving_pts.data):
            return None, (
                f"landmarks not compared: {len(fixed_pts.data)} fixed and "
                f"{len(moving_pts.data)} moving points (point i must match point i)"
            )
        if len(fixed_pts.data) == 0:
            return None, ""
        moving = request.moving
        units = getattr(moving, "units", None)
        unit = str(units[-1]) if units is not None and len(units) else None
        return {
            "fixed": _points_in_pixels(fixed_pts, request.fixed),
            "moving": _points_in_pixels(moving_pts, moving),
            "spacing": tuple(float(v) for v in moving.scale[-2:]),
            "unit": None if unit in (None, "pixel") else unit,
            "names": (fixed_pts.name, moving_pts.name),
        }, ""

    def _request(self) -> Request:
        """Validate the chosen layers and slices (ValueError with a clear message)."""
        fixed, moving = self.fixed_combo.layer(), self.moving_combo.layer()
        check_image_pair(
            fixed,
            moving,
            missing="choose a fixed and a moving image layer (or open image files with 'Open…')",
            rgb=True,
            same_shape=False,
        )
        if fixed is moving:
            raise ValueError(
                f"{fixed.name!r} is chosen as both the fixed and the moving image; choose "
                "two different layers"
            )
        request = self.volume_box.request(fixed, moving)
        if request.axis is not None:
            nf, nm = fixed.data.shape[request.axis], moving.data.shape[request.axis]
            if nf != nm:
                raise ValueError(
                    f"the fixed stack has {nf} slices along axis {request.axis} and the "
                    f"moving one {nm}: slice i is registered to slice i, so they need as many"
                )
        return request

    # ------------------------------------------------------------------ model
    def device(self) -> str | None:
        """The chosen device (``None``: auto); shared with the other widgets by the state."""
        return self.model_box.device()

    def load_shipped(self, name: str) -> bool:
        """Make the shipped model ``name`` (a key of ``SHIPPED_MODELS``) current."""
        return self.model_box.load_shipped(name)

    def load_checkpoint(self, path) -> bool:
        """Load a checkpoint file as the current model; errors become notifications."""
        return self.model_box.load_checkpoint(path)

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
            self._show_error(f"not started: {exc}", str(exc))
            return None
        state = self.state
        device = self.device()
        if model_name is None:
            model_name = state.model_name if model is None else "adapted model"
        fixed_data, moving_data = request.fixed.data, request.moving.data
        axis = request.axis
        method, refine = self.model_box.method(), self.model_box.refine_settings()
        prealign = self.prealign()
        # the layers' physical pixel sizes (row, col) of the registered plane
        fixed_spacing = _plane_spacing(request.fixed, axis)
        moving_spacing = _plane_spacing(request.moving, axis)
        moving_rgb = bool(getattr(request.moving, "rgb", False))
        display = {
            "vector_step": self.vector_step_spin.value(),
            "grid_spacing": float(self.grid_spacing_spin.value()),
        }
        # read on the GUI thread: the worker builds the run and its outputs
        placement = {
            "fixed_layer": weakref.ref(request.fixed),
            "moving_layer": weakref.ref(request.moving),
            "fixed_name": request.fixed.name,
            "moving_name": request.moving.name,
            "fixed_scale": tuple(float(v) for v in request.fixed.scale),
            "fixed_translate": tuple(float(v) for v in request.fixed.translate),
            "name_prefix": name_prefix(self.viewer, request.fixed.name, request.moving.name),
        }
        landmarks, self._landmarks_note = self._landmarks(request)
        n = len(request.indices)
        job_box: list[Job] = []

        def body(stop: threading.Event):
            # None: the shipped model, loaded once per device and cached by ``register``
            mdl = model if model is not None else state.model
            job = job_box[0]
            results, fixed_slices, colour = {}, {}, {}

            def on_step(number: int, done: int, total: int) -> None:
                # one slice = 100 units; the histograms take the last 10
                job.report(number * 100 + (90 * done) // max(total, 1), n * 100)

            spec = RegistrationSpec(
                fixed_data,
                moving_data,
                axis=axis,
                indices=None if axis is None else tuple(request.indices),
                model=mdl,
                device=device,
                method=method,
                refine=refine,
                prealign=prealign,
                fixed_spacing=fixed_spacing,
                moving_spacing=moving_spacing,
                histograms=True,  # here, not on the GUI thread
                on_step=on_step,
            )
            run = run_registration(spec)
            try:
                for record in run:
                    index, res = record.index, record.result
                    f, m = spec.pair(index)
                    results[index], fixed_slices[index] = res, gray_image(f)
                    if moving_rgb:  # the warped colour image (the result's is its luminance)
                        colour[index] = warp_to_grid(m, res.displacement, order=1)
                    job.report(record.number * 100, n * 100)
                    yield record.number
                    if stop.is_set():
                        break
            except StopRequested:
                pass
            finally:
                run.close()
            if not results:
                return None
            run = RegistrationRun(
                fields={k: r.displacement for k, r in results.items()},
                results=dict(results),
                axis=axis,
                model_name=model_name,
                warped={k: r.warped for k, r in results.items()},
                stride=next(iter(results.values())).stride,
                warped_colour=colour,
                **placement,
            )
            if landmarks is not None and None in results:
                run.tre = tre_summary(
                    landmarks["fixed"],
                    landmarks["moving"],
                    results[None].displacement,
                    spacing=landmarks["spacing"],
                    unit=landmarks["unit"],
                )
                run.tre["layers"] = list(landmarks["names"])
            run.outputs = prepare_outputs(run, fixed_slices, **display)
            return run

        self.progress.setRange(0, n * 100)
        self.progress.setValue(0)
        self._running_text = f"registering with {model_name} ({method})…"
        self.status_label.setText(self._running_text)
        self.register_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.job = Job(
            body,
            context="registration",
            on_progress=lambda done, total: self.progress.setValue(done),
            on_return=lambda run: self._registered(request, run, model_name),
            on_failure=lambda exc: self.status_label.setText(f"failed: {_notify.describe(exc)}"),
            on_finish=self._job_finished,
        )
        job_box.append(self.job)
        self.job.start()
        return self.job

    def _show_error(self, status: str, message: str | None = None) -> None:
        """An error notification (``message``, else ``status``) and ``status`` in the
        status line, which never keeps an earlier run's text after an error."""
        _notify.error(message or status)
        self.status_label.setText(status)

    def stop(self) -> None:
        """Stop a running registration within one optimiser step (of every slice: after
        the slices already registered, which are shown)."""
        if self.job is not None and self.job.is_running:
            self.job.request_stop()
            self.status_label.setText("stopping…")

    def _job_finished(self) -> None:
        self.register_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        if self.status_label.text() in (self._running_text, "stopping…", "showing the result…"):
            self.status_label.setText("registration ended without a result")  # never stale

    def _registered(
        self, request: Request, run: RegistrationRun | None, model_name: str
    ) -> Iterator[str] | None:
        if run is None:
            self.status_label.setText("stopped before the first slice was registered")
            return None
        if request.fixed not in self.viewer.layers or request.moving not in self.viewer.layers:
            self.status_label.setText(
                "the fixed or moving layer was removed during registration: nothing to show"
            )
            _notify.warning("the fixed or moving layer was removed during registration")
            return None
        # the job runs these steps one per event-loop turn: one output layer each
        return self._present(request, run, model_name)

    def _present(self, request: Request, run: RegistrationRun, model_name: str) -> Iterator[str]:
        self.status_label.setText("showing the result…")
        yield from self.show_run_steps(run)
        results = run.results
        first = next(iter(results.values()))
        mean_disc = float(np.mean([r.discrepancy.mean() for r in results.values()]))
        fallbacks = sum(r.identity_fallback for r in results.values())
        guarded = (
            f"; {fallbacks} slice(s) kept unmoved: the field matched worse than no "
            "motion (MIND-SSC)"
            if fallbacks
            else ""
        )
        beyond = sum(r.capture_warning is not None for r in results.values())
        if beyond:  # the network's field hit its capture range (CaptureRangeWarning)
            guarded += (
                f"; {beyond} slice(s): the motion may be larger than the network's capture "
                "range (the bspline method reaches further)"
            )
        stopped = (
            f" (stopped: {len(results)} of {len(request.indices)} slices)"
            if len(results) < len(request.indices)
            else ""
        )
        notes = _result_warnings(results.values())
        if notes:
            guarded += "; probably wrong: " + "; ".join(notes)
        if run.tre is not None:
            guarded += f"; {format_tre(run.tre)}"
        elif self._landmarks_note:
            guarded += f"; {self._landmarks_note}"
        self.status_label.setText(
            f"registered {len(results)} slice(s){stopped} with {method_summary(first)} "
            f"({model_name}); mean head discrepancy (pEMD) {mean_disc:.3f} bins{guarded}"
        )
        for note in notes:
            _notify.warning(f"the registration is probably wrong: {note}")
        if fallbacks:
            hint = (
                "try the bspline method or an adaptation"
                if first.method.startswith("network")
                else "the images may not overlap enough for a deformable registration"
            )
            _notify.warning(
                f"{fallbacks} of {len(results)} slice(s): the field matched worse than "
                f"no motion, so the zero field was used; {hint}"
            )

    # ------------------------------------------------------------------ outputs
    def show_run(self, run: RegistrationRun) -> None:
        """Add or update the output layers of ``run`` and share it with the other widgets."""
        for _ in self.show_run_steps(run):
            pass

    def show_run_steps(self, run: RegistrationRun) -> Iterator[str]:
        """:meth:`show_run` one output layer at a time (a generator)."""
        if not run.name_prefix:  # a run made elsewhere (a loaded field)
            run.name_prefix = name_prefix(self.viewer, run.fixed_name, run.moving_name)
        if run.outputs is None:  # a run made elsewhere (a loaded field): prepare it here
            fixed = run.layer("fixed")
            slices = {
                k: gray_image(
                    np.asarray(fixed.data if k is None else np.take(fixed.data, k, axis=run.axis))
                )
                for k in run.fields
            }
            run.outputs = prepare_outputs(
                run,
                slices,
                vector_step=self.vector_step_spin.value(),
                grid_spacing=float(self.grid_spacing_spin.value()),
            )
        shown = {role for role, check in self.show_checks.items() if check.isChecked()}
        layers: dict = {}
        yield from show_outputs_steps(
            self.viewer, run, run.outputs, mode=self.review_mode(), shown=shown, layers=layers
        )
        arrows = layers.get(DISPLACEMENT)
        if arrows is not None:  # the dense field, for File > Save Selected Layer
            arrows.metadata = {**arrows.metadata, **field_metadata(run)}
        self.state.set_run(run)
        self._hide_moving_under_review()

    def prealign(self) -> str:
        """The pre-alignment: ``"affine"`` (default), ``"rigid"`` or ``"none"``."""
        return str(self.prealign_combo.currentData())

    def set_prealign(self, mode: str) -> None:
        select_data(self.prealign_combo, mode, "pre-alignment", PREALIGN_CHOICES)

    def review_mode(self) -> str:
        """The review view: ``"checkerboard"`` (default), ``"blend"``, ``"difference"``, ``"off"``."""
        return str(self.review_combo.currentData())

    def set_review_mode(self, mode: str) -> None:
        select_data(self.review_combo, mode, "review mode", REVIEW_MODES)

    def _review_changed(self) -> None:
        run = self.state.run
        if run is not None and run.outputs is not None and run.layer("fixed") is not None:
            set_review_mode(self.viewer, run, run.outputs, self.review_mode())
            self._hide_moving_under_review()

    def _hide_moving_under_review(self) -> None:
        """Hide the last run's moving layer while a review mode is on; show it when off."""
        run = self.state.run
        if run is None or self.review_mode() == "off" or run.layer("fixed") is None:
            self.hidden_moving.restore()
        else:
            self.hidden_moving.hide(run.layer("moving"))

    def _pair_changed(self) -> None:
        """Another pair picked: the moving layer hidden for the last review comes back."""
        hidden = self.hidden_moving.layer
        if hidden is not None and hidden is not self.moving_combo.layer():
            self.hidden_moving.restore()

    def _detail_toggled(self, role: str, shown: bool) -> None:
        if role in DETAIL_ROLES and self.state.run is not None:
            set_detail_visible(self.viewer, self.state.run, role, shown)

    def _apply_clicked(self) -> None:
        layer = self.apply_combo.layer()
        if layer is None:
            self._show_error("choose a Labels or Points layer to apply the field to")
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
            return apply_field(self.viewer, self.state.run, layer, points_frame=points_frame)
        except ValueError as exc:
            self._show_error(f"not applied: {exc}", str(exc))
            return None

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
        try:
            out = save_run_field(path, self.state.run)
        except _notify.USER_ERRORS as exc:
            self._show_error(f"cannot save the field: {_notify.describe(exc)}")
            return None
        self.status_label.setText(f"saved the field to {out}")
        return out

    def _load_field_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load displacement field", "", FIELD_FILTER)
        if path:
            self.load_field(path)

    def load_field(self, path):
        """Read a saved field and warp the chosen moving image with it (no histograms)."""
        model = self.state.model
        try:
            field = load_field(path)
            request = self._request()
            run = run_from_field(
                field,
                request,
                name=f"field {layer_name_for(path)}",
                stride=model.config.stride if model is not None else 4,
            )
        except _notify.USER_ERRORS as exc:
            self._show_error(f"cannot use the field: {_notify.describe(exc)}")
            return None
        self.show_run(run)
        self.status_label.setText(f"warped {request.moving.name!r} with the field from {path}")
        return run

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Stop a running registration and wait for its thread (called on close)."""
        if self.job is not None and self.job.is_running:
            self.job.stop_and_wait()

    def closeEvent(self, event):  # noqa: N802 - Qt API
        self.shutdown()
        self.hidden_moving.restore()
        for combo in (
            self.fixed_combo,
            self.moving_combo,
            self.apply_combo,
            self.fixed_landmarks_combo,
            self.moving_landmarks_combo,
        ):
            combo.disconnect_viewer()
        self.volume_box.disconnect_viewer()
        self.model_box.disconnect_state()
        if self.state.register_widget is self:
            self.state.register_widget = None
        QWidget.closeEvent(self, event)


def _points_in_pixels(points: Points, image: Image) -> np.ndarray:
    """A 2D Points layer's points in (row, col) pixels of a 2D ``image`` (through world
    coordinates: scale and translate; equal to the points' data when both are placed
    alike, as napari's new Points layers and the histology sample are)."""
    world = np.asarray(points.data, float) * np.asarray(points.scale) + np.asarray(points.translate)
    return (world - np.asarray(image.translate)[-2:]) / np.asarray(image.scale)[-2:]


def _plane_spacing(layer: Image, axis: int | None) -> tuple[float, float]:
    """The layer's physical pixel size (row, col) in the registered plane (its scale)."""
    scale = np.abs(np.asarray(layer.scale, dtype=float))
    return tuple(float(scale[a]) for a in in_plane_axes(len(scale), axis))  # type: ignore[return-value]


def _result_warnings(results) -> list[str]:
    """The results' reasons to doubt them (``RegistrationResult.warnings``), each once;
    the capture-range warning has its own words in the status line."""
    notes: list[str] = []
    for r in results:
        for note in getattr(r, "warnings", None) or ():
            if note != r.capture_warning and note not in notes:
                notes.append(note)
    return notes
