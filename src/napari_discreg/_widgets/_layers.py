"""Add a layer, or update the one with the same name: re-running never duplicates layers."""

from __future__ import annotations

import contextlib

import numpy as np
from napari.layers import Image, Labels, Points, Shapes, Vectors

#: ``metadata[META_KEY]`` of the layers the widgets make: ``{"output": role, ...}``
META_KEY = "napari_discreg"


def is_output(layer) -> bool:
    """True for a layer one of the widgets made (never offered as an input)."""
    meta = getattr(layer, "metadata", None) or {}
    return isinstance(meta.get(META_KEY), dict) and "output" in meta[META_KEY]


#: kinds whose elements carry their own colours (see :func:`upsert_layer`)
_PER_ELEMENT = ("points", "vectors", "shapes")

_KINDS = {"image": Image, "labels": Labels, "points": Points, "vectors": Vectors, "shapes": Shapes}

# properties napari lets us set again on an existing layer
_SETTABLE = (
    "scale",
    "translate",
    "colormap",
    "contrast_limits",
    "opacity",
    "blending",
    "metadata",
    "edge_color",
    "edge_width",
    "vector_style",
    "length",
    "size",
    "face_color",
    "border_color",
    "symbol",
    "visible",
)


def warm_up_layer_types() -> None:
    """Build throwaway output layers (never added to a viewer) so that napari's one-time
    costs of a layer type in a session (imports, evented models, signature caches: about
    0.1-0.4 s for the first Vectors layer) are paid when the panel opens, not in the GUI
    thread when the first registration's results arrive."""
    Vectors(np.zeros((1, 2, 2), np.float32), edge_color="yellow", vector_style="arrow")
    Image(np.zeros((2, 2), np.float32), colormap="magma", blending="translucent")


def upsert_layer(viewer, name: str, kind: str, data, **kwargs):
    """Add a ``kind`` layer called ``name`` or update the existing one in place.

    An existing layer of another type, of another dimensionality, or an image that is
    RGB where the new one is not (``rgb`` in ``kwargs``) or the reverse, is replaced (at
    the same position in the layer list).
    """
    cls = _KINDS[kind]
    existing = viewer.layers[name] if name in viewer.layers else None
    rgb = bool(kwargs.get("rgb", False))
    ndim = _data_ndim(kind, data) - (1 if rgb else 0)
    if existing is not None and (
        not isinstance(existing, cls)
        or existing.ndim != ndim
        or (kind == "image" and bool(getattr(existing, "rgb", False)) != rgb)
    ):
        index = viewer.layers.index(existing)
        viewer.layers.remove(existing)
        layer = getattr(viewer, f"add_{kind}")(data, name=name, **kwargs)
        viewer.layers.move(viewer.layers.index(layer), index)
        return layer
    if existing is None:
        return getattr(viewer, f"add_{kind}")(data, name=name, **kwargs)
    layer = existing
    per_element = kind in _PER_ELEMENT
    # everything at once, then one refresh (each setter would redraw the thumbnail)
    with _refresh_blocked(layer):
        # geometry first so that the new data lands in the right place
        for key in ("scale", "translate"):
            if key in kwargs:
                setattr(layer, key, kwargs[key])
        if not per_element:
            layer.data = data
            if kind == "image" and "contrast_limits" not in kwargs:
                layer.reset_contrast_limits()
    if per_element:
        # Vectors, Points and Shapes colour each element: a colour set after the data
        # changed its length is drawn at once from the *view* indices, which only a
        # refresh recomputes (napari 0.9). Inside ``_block_refresh`` they were stale
        # ("index 108 is out of bounds for axis 0 with size 108", issue 27), so the data
        # is set with its refresh, and only the styles are batched. A hidden layer is
        # not refreshed, so its view is recomputed here.
        layer.data = data
        if not layer.visible:
            layer.set_view_slice()
    with _refresh_blocked(layer):
        for key, value in kwargs.items():
            if key in ("scale", "translate", "visible") or key not in _SETTABLE:
                continue
            try:
                setattr(layer, key, value)
            except (ValueError, TypeError, AttributeError):  # pragma: no cover - style only
                pass
    if "visible" in kwargs and layer.visible != bool(kwargs["visible"]):
        layer.visible = bool(kwargs["visible"])  # showing a layer refreshes it
    else:
        layer.refresh()  # a hidden layer refreshes when it is shown
    return layer


def _refresh_blocked(layer):
    """napari's own context that defers a layer's refreshes (a no-op if it is missing)."""
    block = getattr(layer, "_block_refresh", None)
    return block() if callable(block) else contextlib.nullcontext()


def _data_ndim(kind: str, data) -> int:
    if kind in ("image", "labels"):
        return np.asarray(data).ndim
    if kind == "vectors":
        arr = np.asarray(data)
        return arr.shape[-1]
    if kind == "points":
        arr = np.asarray(data)
        return arr.shape[-1] if arr.ndim == 2 and arr.size else 2
    raise ValueError(kind)


def check_image_pair(
    fixed,
    moving,
    *,
    what: str = "",
    missing: str,
    rgb: bool = False,
    same_shape: bool = True,
) -> None:
    """Raise a clear ValueError unless ``fixed`` and ``moving`` are two single-scale 2D/3D
    Image layers (``what``: e.g. "target ").

    With ``rgb``, 2D RGB(A) layers are accepted too; with ``same_shape`` (default) the
    two must have one shape, otherwise only as many dimensions.
    """
    if fixed is None or moving is None:
        raise ValueError(missing)
    for role, layer in (("fixed", fixed), ("moving", moving)):
        if not isinstance(layer, Image):
            raise ValueError(f"the {role} {what}layer {layer.name!r} is not an image layer")
        if getattr(layer, "rgb", False) and not rgb:
            raise ValueError(
                f"the {role} {what}layer {layer.name!r} is an RGB image; this needs one "
                "grayscale channel (convert it first, e.g. skimage.color.rgb2gray)"
            )
        if getattr(layer, "rgb", False) and layer.ndim != 2:
            raise ValueError(
                f"the {role} {what}layer {layer.name!r} is a stack of RGB images; register "
                "one 2D RGB image (or convert the stack to grayscale first)"
            )
        if getattr(layer, "multiscale", False):
            raise ValueError(
                f"the {role} {what}layer {layer.name!r} is multiscale; use one scale level"
            )
        if layer.ndim not in (2, 3):
            raise ValueError(
                f"the {role} {what}layer {layer.name!r} has {layer.ndim} dimensions; use 2D images "
                "or 3D stacks (one 2D slice per index)"
            )
    if same_shape and tuple(fixed.data.shape) != tuple(moving.data.shape):
        raise ValueError(
            f"{what}fixed {tuple(fixed.data.shape)} ({fixed.name!r}) and moving "
            f"{tuple(moving.data.shape)} ({moving.name!r}) must have the same shape; "
            "resample or crop one onto the other's grid first"
        )
    if fixed.ndim != moving.ndim:
        raise ValueError(
            f"{what}fixed {fixed.name!r} is {fixed.ndim}D and moving {moving.name!r} is "
            f"{moving.ndim}D: choose two 2D images or two 3D stacks"
        )
