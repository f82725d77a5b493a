"""The Register widget's output layers, and the field applied to Labels and Points layers.

Each registration's outputs are named after its moving layer, ``"<moving> <role>"``, or
``"<moving> → <fixed> <role>"`` when that name is taken by another pair's output or a
layer of the user's (:func:`name_prefix`, :func:`output_name`), so registering another
pair never overwrites them and re-running a pair updates its own layers in place. Every output carries
``metadata["napari_discreg"]`` (its role and pair) and is never offered as an input
(:func:`is_output`). While a review mode is on, the unregistered moving layer is hidden
(:class:`HiddenMoving`). The roles:

* ``warped`` - the moving image warped onto the fixed one, shown over the fixed image
  (the review view's *blend*);
* ``review`` - a checkerboard of the fixed and the warped image (the default review),
  or their difference (both intensity-normalised);
* ``displacement`` - Vectors from each foreground control point ``x`` to ``x + u(x)``,
  where the fixed pixel ``x`` samples the moving image (hidden until asked for);
* ``deformation grid`` - a regular grid of the moving image warped like the image
  (line segments, see :func:`napari_discreg.core.registration.geometry.deformation_grid`; hidden);
* ``discrepancy`` - the projected EMD between the two heads per control point (bins),
  placed with scale/translate so that each value covers its control point's block
  (hidden).

:func:`prepare_outputs` computes every array (grid inversion, Jacobians, review images)
and runs in the worker thread; :func:`show_outputs_steps` only hands them to napari, one layer per event-loop turn.
All new layers take the fixed layer's scale and translate. For a 3D fixed layer the
outputs of the registered slices are stacked along the registered axis and placed at
those slices of the volume.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from napari.layers import Image, Labels, Points

from ..core.registration.geometry import (
    deformation_grid,
    displacement_vectors,
    fixed_to_moving,
    in_plane_axes,
    insert_axis,
    moving_to_fixed,
)
from ..core.registration.review import foreground_vectors, review_images, warp_to_grid
from ..core.registration.warp import jacobian_determinant, warp_numpy
from . import _notify
from ._layers import META_KEY, upsert_layer
from ._state import RegistrationRun

WARPED_SUFFIX = " warped"
WARPED, REVIEW, DISPLACEMENT, GRID, DISCREPANCY = (
    "warped",
    "review",
    "displacement",
    "deformation grid",
    "discrepancy",
)
#: review modes: how the warped image is compared with the fixed one. The first is the
#: default: the checkerboard, because the pairs this plugin is for are multimodal, and a
#: 50 % blend of two contrasts (T1 over T2, HE over an immunostain) is close to flat grey
#: where they are aligned, while a checkerboard shows each edge crossing a tile border
#: whatever the contrasts. The default does not depend on the pair (a view that changed
#: with the data would surprise); blend is a click away for mono-modal pairs.
REVIEW_MODES = {
    "checkerboard": "checkerboard: tiles of the fixed and the warped image alternate",
    "blend": "blend: the warped image at 50 % over the fixed one",
    "difference": "difference: |fixed - warped| of the normalised intensities",
    "off": "off: no review layer; the unregistered moving image is shown again",
}
DEFAULT_REVIEW = "checkerboard"
#: the pre-alignments the Register widget offers (``register(prealign=...)``)
PREALIGN_CHOICES = {
    "affine": "affine: rotation, shift, scale and shear (default)",
    "rigid": "rigid: rotation and shift only",
    "none": "none: the images are aligned already; only local motion is left",
}
DEFAULT_PREALIGN = "affine"
#: roles the user shows with the Display box's check boxes (hidden by default)
DETAIL_ROLES = (DISPLACEMENT, GRID, DISCREPANCY)
POINTS_FRAMES = {
    "moving": "points on the moving image -> fixed frame",
    "fixed": "points on the fixed image -> moving frame",
}
#: every output a registration names after its pair
OUTPUT_ROLES = (WARPED, REVIEW, DISPLACEMENT, GRID, DISCREPANCY)


def pair_prefix(fixed_name: str, moving_name: str) -> str:
    """The long form of the name a pair's outputs start with: both layers' names."""
    return f"{moving_name} → {fixed_name}"


def name_prefix(viewer, fixed_name: str, moving_name: str) -> str:
    """What the names of a pair's outputs start with: the moving layer's name.

    napari's layer list cuts a name longer than its width in the middle, and with both
    names (``"moving (T2-like) → fixed (T1) discrepancy"``, 41 characters) what was cut
    was the pair. The fixed layer's name is added (:func:`pair_prefix`) only when a layer
    already has the short name of one of the outputs and is not an output of this pair
    (the same moving image registered onto a second fixed image, or a layer of the
    user's), or when the pair's outputs have the long names already, so no pair's outputs,
    and no other layer, are ever overwritten or doubled. Read on the GUI thread when a run
    starts.
    """
    pair = {"fixed": fixed_name, "moving": moving_name}
    long = pair_prefix(fixed_name, moving_name)
    short_names = {f"{moving_name} {role}" for role in OUTPUT_ROLES}
    long_names = {f"{long} {role}" for role in OUTPUT_ROLES}
    for layer in viewer.layers:
        if layer.name not in short_names and layer.name not in long_names:
            continue
        meta = (getattr(layer, "metadata", None) or {}).get(META_KEY)
        ours = isinstance(meta, dict) and meta.get("pair") == pair
        if layer.name in long_names and ours:
            return long  # the pair's outputs have the long names already: update those
        if layer.name in short_names and not ours:
            return long
    return moving_name


def output_name(run: RegistrationRun, role: str) -> str:
    """The layer name of ``role`` (e.g. ``"warped"``) for the pair of ``run``."""
    return f"{run.name_prefix or pair_prefix(run.fixed_name, run.moving_name)} {role}"


def output_meta(role: str, run: RegistrationRun | None = None, **extra) -> dict:
    """``metadata`` of an output layer: what it is, for the pickers and for the user."""
    info = {"output": role, **extra}
    if run is not None:
        info["pair"] = {"fixed": run.fixed_name, "moving": run.moving_name}
        if run.tre is not None:
            info["tre"] = run.tre
    return {META_KEY: info}


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
    scale = np.asarray(run.fixed_scale, dtype=float).copy()
    translate = np.asarray(run.fixed_translate, dtype=float).copy()
    for a in in_plane_axes(len(scale), run.axis):
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


@dataclass
class OutputLayers:
    """Every array the output layers of a run show (made by :func:`prepare_outputs`)."""

    warped: np.ndarray
    review: dict[str, np.ndarray]
    vectors: np.ndarray
    grid: np.ndarray
    residual: float
    folded: float
    discrepancy: np.ndarray | None = None
    discrepancy_max: float = 1.0
    vector_step: int = 1
    grid_spacing: float = 8.0
    meta: dict = dataclasses.field(default_factory=dict)


def prepare_outputs(
    run: RegistrationRun, fixed_slices: dict, *, vector_step: int, grid_spacing: float
) -> OutputLayers:
    """Compute what the output layers of ``run`` show (pure NumPy: run it in a worker).

    ``fixed_slices`` maps each slice index of ``run`` to the fixed image of that slice.
    """
    vectors, segments, residual, folded = [], [], 0.0, 0.0
    review: dict[str, dict] = {"checkerboard": {}, "difference": {}}
    for index, fld in run.fields.items():
        fixed, warped = np.asarray(fixed_slices[index]), run.warped[index]
        v = displacement_vectors(fld, run.stride, vector_step)
        v = foreground_vectors(v, fixed, warped, run.stride)
        g, res = deformation_grid(fld, grid_spacing)
        residual = max(residual, res)
        folded = max(folded, float((jacobian_determinant(fld) <= 0).mean()))
        vectors.append(embed_vectors(v, run.axis, index))
        segments.append(embed_vectors(g, run.axis, index))
        for mode, image in review_images(fixed, warped).items():
            review[mode][index] = image
    ndim = 2 if run.axis is None else 3
    colour = getattr(run, "warped_colour", None)
    out = OutputLayers(
        warped=stack_slices(run, colour if colour else run.warped),
        review={mode: stack_slices(run, images) for mode, images in review.items()},
        vectors=np.concatenate(vectors) if vectors else np.zeros((0, 2, ndim)),
        grid=np.concatenate(segments),
        residual=residual,
        folded=folded,
        vector_step=vector_step,
        grid_spacing=grid_spacing,
    )
    if run.results:
        disc = {k: r.discrepancy for k, r in run.results.items()}
        out.discrepancy = stack_slices(run, disc)
        out.discrepancy_max = max(float(max(d.max() for d in disc.values())), 1e-6)
    return out


def show_outputs_steps(
    viewer,
    run: RegistrationRun,
    outputs: OutputLayers,
    *,
    mode: str = DEFAULT_REVIEW,
    shown=(),
    layers: dict | None = None,
) -> Iterator[str]:
    """Add or update the output layers of ``run`` from ``outputs`` (GUI thread; no
    computing here), yielding after each layer (its role) so that the GUI returns to its
    event loop between layers: adding a napari layer builds its visual and its controls
    (about 0.1 s each), and five at once would freeze the window for half a second.

    The warped image (or the review image of ``mode``) is shown; of the field, grid and
    discrepancy layers only the roles in ``shown`` (hidden otherwise). ``layers``
    (optional) receives ``{role: layer}``."""
    fixed, moving = run.layer("fixed"), run.layer("moving")
    if fixed is None or moving is None:
        raise ValueError("the registered layers no longer exist")
    scale, translate = placement(run)
    fscale = np.asarray(run.fixed_scale, dtype=float)
    ftranslate = np.asarray(run.fixed_translate, dtype=float)
    layers = {} if layers is None else layers

    def visible(role: str) -> bool:
        return role in shown

    warped_kwargs = {"scale": scale, "translate": translate, "blending": "translucent"}
    if getattr(run, "warped_colour", None):
        warped_kwargs["rgb"] = True  # the moving image's colours, warped
    elif isinstance(moving, Image) and not moving.rgb:
        warped_kwargs["colormap"] = moving.colormap.name
        warped_kwargs["contrast_limits"] = tuple(moving.contrast_limits)
    warped_view, review_view = review_properties(run, outputs, mode)
    layers[WARPED] = upsert_layer(
        viewer,
        output_name(run, WARPED),
        "image",
        outputs.warped,
        metadata=output_meta(WARPED, run, meaning="the moving image warped onto the fixed one"),
        **warped_view,
        **warped_kwargs,
    )
    yield WARPED
    layers[REVIEW] = upsert_layer(
        viewer,
        output_name(run, REVIEW),
        "image",
        review_view.pop("data"),
        scale=scale,
        translate=translate,
        contrast_limits=(0.0, 1.0),
        **review_view,
    )
    yield REVIEW
    layers[DISPLACEMENT] = upsert_layer(
        viewer,
        output_name(run, DISPLACEMENT),
        "vectors",
        outputs.vectors,
        scale=fscale,
        translate=ftranslate,
        edge_color="yellow",
        edge_width=0.4,
        length=1.0,
        vector_style="arrow",
        visible=visible(DISPLACEMENT),
        metadata=output_meta(
            DISPLACEMENT, run, meaning="arrow from fixed pixel x to x + u(x) in the moving image"
        ),
    )
    yield DISPLACEMENT
    layers[GRID] = upsert_layer(
        viewer,
        output_name(run, GRID),
        "vectors",
        outputs.grid,
        scale=fscale,
        translate=ftranslate,
        edge_color="cyan",
        edge_width=0.3,
        length=1.0,
        vector_style="line",
        opacity=0.8,
        visible=visible(GRID),
        metadata=output_meta(
            GRID, run, meaning="regular grid of the moving image, warped like the image"
        ),
    )
    yield GRID
    if outputs.folded > 0:
        # the grid needs the inverse map, which a folding field does not have there
        off = f" (up to {outputs.residual:.1f} px off)" if outputs.residual > 0.5 else ""
        _notify.warning(
            f"the field folds on {outputs.folded:.2%} of the pixels (it maps some of them onto "
            "the same place, so it has no inverse there): the deformation grid is drawn "
            f"approximately there{off}; the warped image is exact"
        )
    name = output_name(run, DISCREPANCY)
    if outputs.discrepancy is not None:
        dscale, dtranslate = placement(run, cell=float(run.stride))
        layers[DISCREPANCY] = upsert_layer(
            viewer,
            name,
            "image",
            outputs.discrepancy,
            scale=dscale,
            translate=dtranslate,
            colormap="magma",
            opacity=0.5,
            blending="translucent",
            contrast_limits=(0.0, outputs.discrepancy_max),
            visible=visible(DISCREPANCY),
            metadata=output_meta(
                DISCREPANCY,
                run,
                meaning="projected EMD between heads F1 and F2 per control point (bins)",
            ),
        )
        yield DISCREPANCY
    elif name in viewer.layers:
        viewer.layers.remove(name)  # a loaded field has no histograms


def set_review_mode(viewer, run: RegistrationRun, outputs: OutputLayers, mode: str) -> None:
    """Switch the review view of ``run``'s outputs to ``mode`` (a key of REVIEW_MODES)."""
    views = review_properties(run, outputs, mode)
    for role, view in zip((WARPED, REVIEW), views, strict=True):
        layer = _layer(viewer, output_name(run, role))
        if layer is not None:
            for key, value in view.items():  # "data" first: the rest styles it
                setattr(layer, key, value)


def review_properties(run: RegistrationRun, outputs: OutputLayers, mode: str) -> tuple[dict, dict]:
    """The properties of the warped and the review layer in review ``mode`` (a key of
    REVIEW_MODES): what both the first show and a switch of mode set."""
    if mode not in REVIEW_MODES:
        raise ValueError(f"review mode must be one of {tuple(REVIEW_MODES)}, got {mode!r}")
    warped = {"opacity": 0.5, "visible": mode == "blend"}
    review = {
        "data": outputs.review["difference" if mode == "difference" else "checkerboard"],
        "colormap": "inferno" if mode == "difference" else "gray",
        "visible": mode in ("checkerboard", "difference"),
        "metadata": output_meta(REVIEW, run, mode=mode, meaning=REVIEW_MODES[mode]),
    }
    return warped, review


class HiddenMoving:
    """The unregistered moving layer that the review view hid, to show it again.

    While a review mode is on, the moving layer of the pair under review is hidden
    (between the fixed layer and the warped one it showed doubled edges, issue 27). It
    is shown again when the review is switched off, when another pair is picked or
    registered, and when the panel closes; a layer the user had hidden stays hidden.
    """

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None

    @property
    def layer(self):
        return self._ref() if self._ref is not None else None

    def hide(self, layer) -> None:
        """Hide ``layer`` (giving back the one hidden before, if another)."""
        if layer is None:
            return self.restore()
        if self.layer is not layer:
            self.restore()
            if not layer.visible:
                return None  # hidden by the user: not ours to show again
            self._ref = weakref.ref(layer)
        layer.visible = False
        return None

    def restore(self) -> None:
        """Show the layer this hid again (if it still exists)."""
        layer, self._ref = self.layer, None
        if layer is not None:
            layer.visible = True


def _layer(viewer, name: str):
    return viewer.layers[name] if name in viewer.layers else None


def set_detail_visible(viewer, run: RegistrationRun, role: str, shown: bool) -> None:
    """Show or hide the ``role`` layer (displacement, grid, discrepancy) of ``run``."""
    name = output_name(run, role)
    if name in viewer.layers:
        viewer.layers[name].visible = shown


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
    shape = tuple(moving.data.shape[:-1] if moving.rgb else moving.data.shape)
    if tuple(data.shape) != shape:
        raise ValueError(
            f"labels {layer.name!r} {tuple(data.shape)} must have the moving image's shape {shape}"
        )
    warped = {}
    for index, field in run.fields.items():
        sl = np.asarray(data if index is None else np.take(data, index, axis=run.axis))
        if sl.shape == field.shape[1:]:
            warped[index] = warp_numpy(sl, field, order=0)
        else:  # a moving image of another size than the fixed one
            warped[index] = warp_to_grid(sl, field, order=0)
    scale, translate = placement(run)
    return upsert_layer(
        viewer,
        layer.name + WARPED_SUFFIX,
        "labels",
        stack_slices(run, warped),
        scale=scale,
        translate=translate,
        opacity=layer.opacity,
        metadata=output_meta("warped labels", run, source=layer.name),
    )


def move_points(viewer, run: RegistrationRun, layer: Points, frame: str):
    """Points of the moving image in the fixed frame (``frame="moving"``, by inverting the
    field) or points of the fixed image in the moving frame (``"fixed"``, ``x + u(x)``)."""
    fixed, moving = run.layer("fixed"), run.layer("moving")
    if fixed is None or moving is None:
        raise ValueError("the registered fixed or moving layer no longer exists")
    if frame not in POINTS_FRAMES:
        raise ValueError(f"points frame must be one of {tuple(POINTS_FRAMES)}, got {frame!r}")
    pts = np.asarray(layer.data, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != fixed.ndim:
        raise ValueError(
            f"points {layer.name!r} have {pts.shape[-1] if pts.ndim == 2 else '?'} coordinates; "
            f"the registered images have {fixed.ndim}"
        )
    # points' data -> world -> pixels of the image they were placed on (scale and
    # translate only); the result is placed on the other image
    source, target = (moving, fixed) if frame == "moving" else (fixed, moving)
    world = pts * np.asarray(layer.scale) + np.asarray(layer.translate)
    coords = (world - np.asarray(source.translate)) / np.asarray(source.scale)
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
        scale=np.asarray(target.scale),
        translate=np.asarray(target.translate),
        size=float(size.mean()) if size.size else 5.0,
        face_color="magenta" if frame == "moving" else "lime",
        metadata={
            "frame": "fixed" if frame == "moving" else "moving",
            "source": layer.name,
            **output_meta("moved points", run, source=layer.name),
        },
    )
