"""A combo box of the viewer's layers of some types that follows the layer list."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtWidgets import QComboBox

from ._layers import is_output

NONE_TEXT = "(none)"


class LayerCombo(QComboBox):
    """Pick a layer of the given types by name; kept in sync with ``viewer.layers``.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    layer_types : tuple of layer classes
        Which layers are offered.
    prefer : callable, optional
        ``prefer(layers) -> layer or None``: the layer to select when the current one
        disappears or the combo is first filled.
    allow_none : bool
        Offer "(none)" as the first entry.
    outputs : bool
        Also offer the layers the widgets made (warped images, fields...); default
        False: outputs are never offered as inputs.
    """

    def __init__(
        self,
        viewer,
        layer_types: tuple[type, ...],
        *,
        prefer: Callable | None = None,
        allow_none: bool = False,
        outputs: bool = False,
        parent=None,
    ) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self._types = layer_types
        self._prefer = prefer
        self._allow_none = allow_none
        self._outputs = outputs
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        events.inserted.connect(self.refresh)
        events.removed.connect(self.refresh)
        events.moved.connect(self.refresh)
        self._named: list = []
        self.refresh()

    def disconnect_viewer(self) -> None:
        events = self._viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            try:
                ev.disconnect(self.refresh)
            except (TypeError, ValueError, RuntimeError):
                pass
        for layer in self._named:
            try:
                layer.events.name.disconnect(self.refresh)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._named = []

    def candidates(self) -> list:
        return [
            layer
            for layer in self._viewer.layers
            if isinstance(layer, self._types) and (self._outputs or not is_output(layer))
        ]

    def refresh(self, *_args) -> None:
        """Rebuild the entries, keeping the current layer when it still exists."""
        current = self._selected_from_index()  # by position: survives a rename
        layers = self.candidates()
        for layer in self._named:
            try:
                layer.events.name.disconnect(self.refresh)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._named = list(layers)
        for layer in layers:
            layer.events.name.connect(self.refresh)
        self.blockSignals(True)
        try:
            self.clear()
            if self._allow_none:
                self.addItem(NONE_TEXT)
            for layer in layers:
                self.addItem(layer.name)
        finally:
            self.blockSignals(False)
        if current is None or current not in layers:
            current = self._prefer(layers) if self._prefer else (layers[0] if layers else None)
        self.blockSignals(True)
        try:
            self.set_layer(current)
        finally:
            self.blockSignals(False)
        # the entries changed even when the index did not: tell the listeners once
        self.currentIndexChanged.emit(self.currentIndex())

    def _selected_from_index(self):
        index = self.currentIndex() - (1 if self._allow_none else 0)
        named = getattr(self, "_named", [])
        return named[index] if 0 <= index < len(named) else None

    def select_preferred(self) -> None:
        """Select the layer the ``prefer`` rule picks now (e.g. after the other combo changed)."""
        layers = self.candidates()
        self.set_layer(self._prefer(layers) if self._prefer else (layers[0] if layers else None))

    def layer(self):
        """The selected layer, or None."""
        return self._selected_from_index()

    def set_layer(self, layer) -> None:
        """Select ``layer`` (None selects "(none)" or nothing)."""
        if layer is None:
            self.setCurrentIndex(0 if self._allow_none else -1)
            return
        index = self.findText(layer.name)
        if index >= 0:
            self.setCurrentIndex(index)


def preferring(
    *keywords: str, avoid: tuple[str, ...] = (), exclude: Callable | None = None, ndim=None
):
    """A ``prefer`` function: the first layer whose name holds a keyword (case-insensitive).

    Layers whose names hold a word of ``avoid`` come last; ``exclude(layer)`` skips layers
    (e.g. the one selected in the other combo); ``ndim`` prefers layers of that
    dimensionality.
    """

    def score(layer) -> tuple:
        name = layer.name.lower()
        return (
            not any(k in name for k in keywords),
            any(a in name for a in avoid),
            ndim is not None and getattr(layer, "ndim", None) != ndim,
        )

    def prefer(layers):
        pool = [layer for layer in layers if exclude is None or not exclude(layer)] or list(layers)
        if not pool:
            return None
        return min(pool, key=score)  # min is stable: ties keep the layer order

    return prefer
