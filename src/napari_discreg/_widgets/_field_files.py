"""Saving the last displacement field, and warping the chosen moving image with a loaded one.

The files are those of :func:`napari_discreg.core.files.imagefiles.save_field`: ``(2, H, W)`` for a
2D pair or one slice, ``(N, 2, H, W)`` for every slice of a stack of ``N`` slices along
the registered axis.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np

from .._field_io import FIELD_KEY, ORIGIN_KEY, SPACING_KEY
from ..core.files.imagefiles import save_field
from ..core.registration.geometry import in_plane_axes
from ..core.registration.review import gray_image, warp_to_grid
from ..core.registration.warp import warp_numpy
from ._register_outputs import placement, slice_order
from ._slices import Request
from ._state import RegistrationRun


def save_run_field(path: str | os.PathLike, run: RegistrationRun | None) -> Path:
    """Write the field of ``run``: one slice ``(2, H, W)``, several ``(N, 2, H, W)``.

    ITK files (``.mha``, ``.nii.gz``) are in physical units: the fixed layer's scale is
    the pixel spacing (and, for several slices, the slice spacing) and its translate
    the origin.
    """
    if run is None:
        raise ValueError("register first: there is no field to save")
    meta = field_metadata(run)
    return save_field(path, meta[FIELD_KEY], spacing=meta[SPACING_KEY], origin=meta[ORIGIN_KEY])


def field_metadata(run: RegistrationRun) -> dict:
    """The dense field of ``run`` (one slice ``(2, H, W)``, several ``(N, 2, H, W)``) with
    its spacing and origin, as the displacement layer's metadata carries them (what
    *File > Save Selected Layer* writes, :mod:`napari_discreg._field_io`)."""
    keys = slice_order(run.fields)
    stack = len(keys) > 1
    arr = np.stack([run.fields[k] for k in keys]) if stack else run.fields[keys[0]]
    return {
        FIELD_KEY: arr,
        SPACING_KEY: field_spacing(run, stack=stack),
        ORIGIN_KEY: field_origin(run, stack=stack),
    }


def field_origin(run: RegistrationRun, *, stack: bool) -> tuple[float, ...] | None:
    """The world position of the field's first pixel in its axis order: where the output
    layers are placed (:func:`placement`; for a stack, the first registered slice along
    the slice axis). ``None`` if unknown."""
    if not run.fixed_translate:
        return None
    _, translate = placement(run)
    plane = [float(translate[a]) for a in in_plane_axes(len(translate), run.axis)]
    if stack and run.axis is not None:
        return (float(translate[run.axis]), *plane)
    return tuple(plane)


def field_spacing(run: RegistrationRun, *, stack: bool) -> tuple[float, ...] | None:
    """The fixed layer's pixel spacing in the field's axis order, or None if unknown."""
    scale = tuple(abs(float(v)) for v in run.fixed_scale)
    if not scale:
        return None
    plane = [scale[a] for a in in_plane_axes(len(scale), run.axis)]
    if stack and run.axis is not None:
        return (scale[run.axis], *plane)
    return tuple(plane)


def run_from_field(
    field: np.ndarray, request: Request, *, name: str, stride: int
) -> RegistrationRun:
    """Warp the request's moving layer with a loaded ``field`` (a run without histograms).

    A field stack ``(N, 2, H, W)`` needs 3D layers with ``N`` slices along the chosen
    axis; one field ``(2, H, W)`` goes to the chosen slice. The field lives on the fixed
    image's grid, in moving pixels (the moving image may have another size, or colour).
    Raises ``ValueError`` when the field does not fit.
    """
    moving = request.moving
    data = moving.data
    fixed = request.fixed.data
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
    warped, colour = {}, {}
    for index, f in fields.items():
        sl = np.asarray(data if index is None else np.take(data, index, axis=request.axis))
        # the field lives on the fixed grid (the moving image may have another size)
        grid = np.shape(fixed if index is None else np.take(fixed, index, axis=request.axis))
        grid = grid[:2]  # an RGB fixed image: its rows and columns
        if f.ndim != 3 or f.shape[0] != 2 or f.shape[1:] != grid:
            raise ValueError(
                f"the field {f.shape} does not fit the fixed image of shape {grid}; "
                "it must be (2, H, W) for an (H, W) fixed image"
            )
        if getattr(moving, "rgb", False):
            colour[index] = warp_to_grid(sl, f, order=1)
            warped[index] = warp_to_grid(gray_image(sl), f, order=1)
        elif sl.shape == f.shape[1:]:
            warped[index] = warp_numpy(sl, f, order=1)
        else:
            warped[index] = warp_to_grid(sl.astype(np.float32), f, order=1)
    return RegistrationRun(
        fields=fields,
        axis=request.axis,
        fixed_layer=weakref.ref(request.fixed),
        moving_layer=weakref.ref(moving),
        model_name=name,
        warped=warped,
        warped_colour=colour,
        stride=stride,
    )
