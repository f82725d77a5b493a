"""What the widgets of one viewer share: the model, the device and the last registration.

Each :class:`napari.viewer.Viewer` gets one :class:`SessionState` (see :func:`state_for`),
kept in a registry that holds the viewer only weakly, so closing a viewer frees it.
The Register widget writes :attr:`SessionState.run` and :attr:`SessionState.device`, the
histogram inspector reads the run, the adaptation widget reads the device and swaps
:attr:`SessionState.model` (Keep / Revert).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psygnal import Signal

from ..core.files.checkpoint import load_model
from ..core.learning.model import resolve_device

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..core.learning.model import DiscreteRegistrationNet
    from ..core.registration.register import RegistrationResult

SHIPPED_MODEL_NAME = "shipped pretrained"


@dataclass
class RegistrationRun:
    """One registration (or a loaded field) as the widgets display it.

    Attributes
    ----------
    fields : dict
        Slice index (``None`` for a 2D pair) -> displacement ``(2, H, W)`` in pixels.
    results : dict
        Slice index -> :class:`~napari_discreg.RegistrationResult`; empty for a field
        loaded from a file (no histograms then).
    axis : int or None
        Axis of the 3D fixed layer the slices were taken along; ``None`` for 2D.
    fixed_layer, moving_layer : weakref.ref
        The layers that were registered.
    model_name : str
        Which model produced it (for the status line and the inspector title).
    warped : dict
        Slice index -> the moving slice warped with its field.
    stride : int
        Control-point spacing of the model (pixels).
    fixed_name, moving_name : str
        The layers' names when registered (the outputs are named after them).
    fixed_scale, fixed_translate : tuple
        The fixed layer's placement when registered (the outputs take it).
    outputs : OutputLayers or None
        What the output layers show (:func:`._register_outputs.prepare_outputs`).
    warped_colour : dict
        Slice index -> the RGB(A) moving image warped onto the fixed grid (empty for a
        grayscale moving image); the warped layer shows it.
    name_prefix : str
        What the output layers' names start with (``_register_outputs.name_prefix``:
        the moving layer's name, or ``"<moving> → <fixed>"``); empty: the latter.
    tre : dict or None
        The landmarks' target registration error before and after
        (:func:`._landmarks.tre_summary`), when landmarks were chosen; also in the
        outputs' metadata.
    """

    fields: dict[int | None, np.ndarray]
    results: dict[int | None, RegistrationResult] = field(default_factory=dict)
    axis: int | None = None
    fixed_layer: Any = None
    moving_layer: Any = None
    model_name: str = ""
    warped: dict[int | None, np.ndarray] = field(default_factory=dict)
    stride: int = 4
    fixed_name: str = ""
    moving_name: str = ""
    fixed_scale: tuple = ()
    fixed_translate: tuple = ()
    outputs: Any = None
    warped_colour: dict[int | None, np.ndarray] = field(default_factory=dict)
    tre: dict | None = None
    name_prefix: str = ""

    def __post_init__(self) -> None:
        fixed, moving = self.layer("fixed"), self.layer("moving")
        if fixed is not None:
            self.fixed_name = self.fixed_name or fixed.name
            if not self.fixed_scale:
                self.fixed_scale = tuple(float(v) for v in fixed.scale)
                self.fixed_translate = tuple(float(v) for v in fixed.translate)
        if moving is not None:
            self.moving_name = self.moving_name or moving.name

    @property
    def indices(self) -> list[int | None]:
        return list(self.fields)

    def layer(self, which: str = "fixed"):
        ref = self.fixed_layer if which == "fixed" else self.moving_layer
        return ref() if ref is not None else None

    def result_for(self, index: int | None) -> RegistrationResult | None:
        """The result of slice ``index``; for a single registered slice, that one."""
        if index in self.results:
            return self.results[index]
        if len(self.results) == 1:
            return next(iter(self.results.values()))
        return None


class SessionState:
    """Model and results shared by the widgets of one viewer.

    Signals
    -------
    model_changed(str)
        The current model was replaced (argument: its display name).
    run_changed()
        A new registration result (or loaded field) is available.
    device_changed(object)
        The device choice changed (argument: ``"cpu"``, ``"cuda"``... or ``None``: auto).
    """

    model_changed = Signal(str)
    run_changed = Signal()
    device_changed = Signal(object)

    def __init__(self) -> None:
        self._model: DiscreteRegistrationNet | None = None
        self.model_name: str = SHIPPED_MODEL_NAME
        self.run: RegistrationRun | None = None
        self._device: str | None = None
        self._register_widget: weakref.ref | None = None
        # models are used from worker threads; swap and load under a lock
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> DiscreteRegistrationNet | None:
        """The model registration uses; ``None`` means the shipped pretrained model."""
        return self._model

    def set_model(self, model: DiscreteRegistrationNet | None, name: str | None = None) -> None:
        """Make ``model`` current (``None``: back to the shipped model)."""
        with self._lock:
            self._model = model
            self.model_name = name or (SHIPPED_MODEL_NAME if model is None else "custom model")
        self.model_changed.emit(self.model_name)

    def resolve_model(self, device=None) -> DiscreteRegistrationNet:
        """The current model, loading the shipped one when none is set.

        Safe to call from a worker thread; raises ``ValueError`` when the shipped
        weights are missing or unreadable.
        """
        with self._lock:
            if self._model is not None:
                if device is not None:
                    self._model.to(resolve_device(device))
                return self._model
            return load_model(None, device)

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> str | None:
        """Where models run and registration happens: ``"cpu"``, ``"cuda"``, or ``None``
        (auto: CUDA when available). The Register widget's device choice sets it."""
        return self._device

    @device.setter
    def device(self, value: str | None) -> None:
        value = None if value in (None, "", "auto") else str(value)
        if value != self._device:
            self._device = value
            self.device_changed.emit(value)

    # ------------------------------------------------------------------ run
    def set_run(self, run: RegistrationRun | None) -> None:
        self.run = run
        self.run_changed.emit()

    # ------------------------------------------------------------------ widgets
    # The adaptation widget's *Re-register* runs the Register widget (its layer, slice
    # and refinement choices) with the adapted model and hands back the job; that is the
    # one use of this reference, held weakly so that closing the widget frees it.
    @property
    def register_widget(self):
        """The open Register widget of this viewer (for *Re-register*), or None."""
        return self._register_widget() if self._register_widget is not None else None

    @register_widget.setter
    def register_widget(self, widget) -> None:
        self._register_widget = weakref.ref(widget) if widget is not None else None


_STATES: dict[int, tuple[weakref.ref, SessionState]] = {}


def unwrap_viewer(viewer):
    """The viewer itself when napari hands a plugin widget a ``PublicOnlyProxy``.

    napari wraps the viewer (and every layer reached through it) in a new proxy on each
    access, so identity checks, weak references and per-viewer registries would not
    work on proxies; the widgets only use the viewer's public API.
    """
    return getattr(viewer, "__wrapped__", viewer)


def state_for(viewer) -> SessionState:
    """The :class:`SessionState` of ``viewer`` (created on first use, freed with the viewer)."""
    viewer = unwrap_viewer(viewer)
    key = id(viewer)
    entry = _STATES.get(key)
    if entry is not None and entry[0]() is viewer:
        return entry[1]
    state = SessionState()

    def _forget(_ref, key=key):
        current = _STATES.get(key)
        if current is not None and current[0] is _ref:
            del _STATES[key]

    _STATES[key] = (weakref.ref(viewer, _forget), state)
    return state
