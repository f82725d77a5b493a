"""The Register widget's output layers, and the field applied to Labels and Points layers.

Outputs of a :class:`~._state.RegistrationRun` (added once, then updated in place on
every run, never duplicated):

* ``"<moving> warped"`` - the moving image warped onto the fixed one;
* ``"displacement"`` - Vectors from each control point ``x`` to ``x + u(x)``, where the
  fixed pixel ``x`` samples the moving image;
* ``"deformation grid"`` - a regular grid of the moving image warped like the image
  (line segments, see :func:`napari_discreg.core.geometry.deformation_grid`);
* ``"discrepancy"`` - the projected EMD between the two heads per control point (bins),
  placed with scale/translate so that each value covers its control point's block.

All new layers take the fixed layer's scale and translate. For a 3D fixed layer the
outputs of the registered slices are stacked along the registered axis and placed at
those slices of the volume.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image, Labels, Points

from ..core.geometry import (
    deformation_grid,
    displacement_vectors,
    fixed_to_moving,
    in_plane_axes,
    insert_axis,
    moving_to_fixed,
)
from ..core.warp import jacobian_determinant, warp_numpy
from . import _notify
from ._layers import upsert_layer
from ._state import RegistrationRun

WARPED_SUFFIX = " warped"
DISPLACEMENT_LAYER = "displacement"
GRID_LAYER = "deformation grid"
DISCREPANCY_LAYER = "discrepancy"
POINTS_FRAMES = {
    "moving": "points on the moving image -> fixed frame",
    "fixed": "points on the fixed image -> moving frame",
}


def slice_order(keys) -> list:
    """Slice indices in stacking order (``None``, the one slice of a 2D pair, first)."""
    return sorted(keys, key=lambda k: -1 if k is None else k)


def stack_slices(run: RegistrationRun, arrays: dict):
    """Per-slice arrays as one array: the 2D one itself, or stacked along ``run.axis``."""
    keys = slice_order(arrays)
    if run.axis is None:
        return arrays[keys[0]]
    return np.stack([arrays[k] for k in keys], axis=run.axis)


def placement(run: RegistrationRun, *, cell: float = 1.0):
    """Scale and translate of a stacked output whose pixels are ``cell`` fixed pixels."""
    fixed = run.layer("fixed")
    scale = np.asarray(fixed.scale, dtype=float).copy()
    translate = np.asarray(fixed.translate, dtype=float).copy()
    for a in in_plane_axes(fixed.ndim, run.axis):
        translate[a] += scale[a] * (cell - 1.0) / 2.0
        scale[a] *= cell
    if run.axis is not None:
        translate[run.axis] += min(run.indices) * scale[run.axis]
    return scale, translate


def embed_vectors(vectors: np.ndarray, axis: int | None, index: int | None) -> np.ndarray:
    """(n, 2, 2) in-plane Vectors data -> (n, 2, D) with the slice coordinate inserted."""
    if axis is None:
        return vectors
    start = insert_axis(vectors[:, 0], axis, float(index))
    delta = insert_axis(vectors[:, 1], axis, 0.0)
    return np.stack([start, delta], axis=1)


def show_outputs(viewer, run: RegistrationRun, *, vector_step: int, grid_spacing: float) -> None:
    """Add or update the output layers of ``run`` (see the module docstring)."""
    fixed, moving = run.layer("fixed"), run.layer("moving")
    if fixed is None or moving is None:
        raise ValueError("the registered layers no longer exist")
    scale, translate = placement(run)
    warped_kwargs = {"scale": scale, "translate": translate, "blending": "translucent"}
    if isinstance(moving, Image):
        warped_kwargs["colormap"] = moving.colormap.name
        warped_kwargs["contrast_limits"] = tuple(moving.contrast_limits)
    upsert_layer(
        viewer, moving.name + WARPED_SUFFIX, "image", stack_slices(run, run.warped), **warped_kwargs
    )

    fscale = np.asarray(fixed.scale, dtype=float)
    ftranslate = np.asarray(fixed.translate, dtype=float)
    vectors, segments, residual, folded = [], [], 0.0, 0.0
    for index, field in run.fields.items():
        v = displacement_vectors(field, run.stride, vector_step)
        g, res = deformation_grid(field, grid_spacing)
        residual = max(residual, res)
        folded = max(folded, float((jacobian_determinant(field) <= 0).mean()))
        vectors.append(embed_vectors(v, run.axis, index))
        segments.append(embed_vectors(g, run.axis, index))
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
    if folded > 0:
        # the grid needs the inverse map, which a folding field does not have there
        off = f" (up to {residual:.1f} px off)" if residual > 0.5 else ""
        _notify.warning(
            f"the field folds on {folded:.2%} of the pixels (it maps some of them onto "
            "the same place, so it has no inverse there): the deformation grid is drawn "
            f"approximately there{off}; the warped image is exact"
        )
    if run.results:
        disc = {k: r.discrepancy for k, r in run.results.items()}
        dscale, dtranslate = placement(run, cell=float(run.stride))
        hi = max(float(max(d.max() for d in disc.values())), 1e-6)
        upsert_layer(
            viewer,
            DISCREPANCY_LAYER,
            "image",
            stack_slices(run, disc),
            scale=dscale,
            translate=dtranslate,
            colormap="magma",
            opacity=0.5,
            blending="translucent",
            contrast_limits=(0.0, hi),
            metadata={"meaning": "projected EMD between heads F1 and F2 per control point (bins)"},
        )
    elif DISCREPANCY_LAYER in viewer.layers:
        viewer.layers.remove(DISCREPANCY_LAYER)  # a loaded field has no histograms


# --------------------------------------------------------------------- apply to layers


def apply_field(viewer, run: RegistrationRun | None, layer, *, points_frame: str = "moving"):
    """Warp a Labels layer or move a Points layer with the field of ``run``.

    See :meth:`napari_discreg._widgets.RegisterWidget.apply_to_layer`. Returns the new
    (or updated) layer; raises ``ValueError`` with a message for the user.
    """
    if run is None:
        raise ValueError("register first (or load a field): there is no field to apply")
    if isinstance(layer, Labels):
        return warp_labels(viewer, run, layer)
    if isinstance(layer, Points):
        return move_points(viewer, run, layer, points_frame)
    raise ValueError(f"{layer.name!r} is not a Labels or Points layer")


def warp_labels(viewer, run: RegistrationRun, layer: Labels):
    """``"<labels> warped"``: a Labels layer of the moving image warped (nearest neighbour)."""
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
    scale, translate = placement(run)
    return upsert_layer(
        viewer,
        layer.name + WARPED_SUFFIX,
        "labels",
        stack_slices(run, warped),
        scale=scale,
        translate=translate,
        opacity=layer.opacity,
    )


def move_points(viewer, run: RegistrationRun, layer: Points, frame: str):
    """Points of the moving image in the fixed frame (``frame="moving"``, by inverting the
    field) or points of the fixed image in the moving frame (``"fixed"``, ``x + u(x)``)."""
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
        viewer,
        layer.name + suffix,
        "points",
        out,
        scale=np.asarray(fixed.scale),
        translate=np.asarray(fixed.translate),
        size=float(size.mean()) if size.size else 5.0,
        face_color="magenta" if frame == "moving" else "lime",
        metadata={"frame": "fixed" if frame == "moving" else "moving", "source": layer.name},
    )
