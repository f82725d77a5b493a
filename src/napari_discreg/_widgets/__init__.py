"""napari widgets of napari-discreg: every Qt, magicgui and napari import lives in this package.

* :class:`RegisterWidget` - register a moving image onto a fixed one, show the field,
  apply it to Labels/Points layers, save and load fields.
* :class:`HistogramInspectorWidget` - the two heads' displacement histograms at a
  clicked control point, with their pEMD, L1 and SWD.
* :class:`AdaptationWidget` - adapt the current model to new target pairs by maximum
  classifier discrepancy, with a live plot; Keep / Revert / Save / Re-register.

The widgets of one viewer share the current model and the last registration through
:func:`state_for`.
"""

from ._state import RegistrationRun, SessionState, state_for
from .adaptation import AdaptationWidget
from .inspector import HistogramInspectorWidget
from .register import RegisterWidget

__all__ = [
    "AdaptationWidget",
    "HistogramInspectorWidget",
    "RegisterWidget",
    "RegistrationRun",
    "SessionState",
    "state_for",
]
