"""napari reader and writer contributions for displacement fields (``napari.yaml``).

Dragging a field file into napari (an ITK displacement field ``.mha``/``.nii``/``.nii.gz``,
as napari-discreg, SimpleITK, elastix or ANTs write them, or a napari-discreg TIFF field)
opens two layers on the field's own grid (its spacing as ``scale``, its origin as
``translate``, an ITK direction other than the identity as ``rotate``): the displacement
magnitude in pixels and arrows from ``x`` to ``x + u(x)``.
Other files with those extensions (plain images and volumes) are left to other readers.

*File > Save Selected Layer(s)* on such an arrows layer, or on the Register widget's
``displacement`` layer, writes the dense field it carries (``metadata["displacement_field"]``)
in the format of the extension chosen, with its spacing and origin.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FIELD_KEY = "displacement_field"
"""The layer metadata key that holds the dense field (pixels, (row, col) components)."""
SPACING_KEY = "field_spacing"
ORIGIN_KEY = "field_origin"

_ITK = (".mha", ".nii", ".nii.gz")
_TIFF = (".tif", ".tiff")
ARROWS_PER_SIDE = 32
"""About this many arrows along the longer side of a field opened from a file."""


def _extension(path: str) -> str:
    name = os.fspath(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def _tiff_meta(path: str) -> dict[str, Any] | None:
    """The napari-discreg field description of a TIFF, or None if it has none."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            text = tif.pages[0].description  # type: ignore[union-attr]
        meta = json.loads(text)
    except Exception:  # noqa: BLE001 - any unreadable file or description: not a field
        return None
    if isinstance(meta, dict) and meta.get("kind") == "displacement field":
        return meta
    return None


def is_field_file(path: str) -> bool:
    """True when ``path`` declares itself a displacement field (never raises)."""
    from .core.files.itk_field import is_itk_field

    ext = _extension(path)
    if ext in _ITK:
        return Path(path).is_file() and is_itk_field(path, ext)
    if ext in _TIFF:
        return _tiff_meta(path) is not None
    return False


def get_field_reader(path: str | list[str]):
    """The reader of a displacement-field file, or ``None`` for any other file (npe2's
    ``napari_get_reader`` contract: napari then asks the next reader)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)) or not is_field_file(os.fspath(path)):
        return None
    return read_field_layers


def _geometry(path: str, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...], Any]:
    """Spacing, origin and direction (``None``: identity) of a field file's grid, in
    array order: napari's ``scale``, ``translate`` and ``rotate``."""
    ext = _extension(path)
    if ext in _ITK:
        from .core.files.itk_field import itk_geometry

        g = itk_geometry(path, ext)
        return g.spacing, g.origin, None if g.axis_aligned else np.asarray(g.direction)
    meta = _tiff_meta(path) or {}
    spacing = tuple(float(v) for v in meta.get("spacing") or (1.0,) * ndim)
    origin = tuple(float(v) for v in meta.get("origin") or (0.0,) * ndim)
    if len(spacing) != ndim or len(origin) != ndim:
        return (1.0,) * ndim, (0.0,) * ndim, None
    return spacing, origin, None


def field_arrows(field: np.ndarray, step: int) -> np.ndarray:
    """napari Vectors data from every ``step``-th pixel ``x`` to ``x + u(x)``: ``(n, 2, 2)``
    for a field ``(2, H, W)``, ``(n, 2, 3)`` (slice, row, col) for a stack ``(N, 2, H, W)``."""
    stack = field if field.ndim == 4 else field[None]
    h, w = stack.shape[-2:]
    rr, cc = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    rr, cc = rr.ravel(), cc.ravel()
    out = []
    for k, f in enumerate(stack):
        pos = np.stack([rr, cc], 1).astype(np.float32)
        vec = np.stack([f[0][rr, cc], f[1][rr, cc]], 1).astype(np.float32)
        if field.ndim == 4:
            z = np.full((len(rr), 1), float(k), np.float32)
            pos = np.concatenate([z, pos], 1)
            vec = np.concatenate([np.zeros_like(z), vec], 1)
        out.append(np.stack([pos, vec], 1))
    return np.concatenate(out) if out else np.zeros((0, 2, field.ndim - 1), np.float32)


def read_field_layers(path: str | list[str]) -> list[tuple]:
    """The layers of a field file: its magnitude (pixels) and its arrows, placed on the
    field's grid; the arrows layer carries the dense field (to save it again)."""
    from .core.files.imagefiles import load_field

    p = os.fspath(path[0] if isinstance(path, list) else path)
    field = load_field(p)
    ndim = field.ndim - 1
    spacing, origin, direction = _geometry(p, ndim)
    stem = Path(p).name
    for suffix in (".nii.gz", *_ITK, *_TIFF):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    step = max(1, round(max(field.shape[-2:]) / ARROWS_PER_SIDE))
    magnitude = np.hypot(field[..., 0, :, :], field[..., 1, :, :]).astype(np.float32)
    meta = {FIELD_KEY: field, SPACING_KEY: spacing, ORIGIN_KEY: origin, "source": p}
    placed: dict[str, Any] = {"scale": spacing, "translate": origin}
    if direction is not None:  # an ITK direction other than the identity: flips, rotations
        placed["rotate"] = direction
    top = float(magnitude.max()) if magnitude.size else 0.0
    return [
        (
            magnitude,
            {
                "name": f"{stem} |u| (px)",
                "colormap": "magma",
                "contrast_limits": (0.0, top if top > 0 else 1.0),
                "metadata": {"meaning": "displacement magnitude in pixels", "source": p},
                **placed,
            },
            "image",
        ),
        (
            field_arrows(field, step),
            {
                "name": f"{stem} displacement",
                "edge_color": "yellow",
                "edge_width": 0.4,
                "length": 1.0,
                "vector_style": "arrow",
                "metadata": meta,
                **placed,
            },
            "vectors",
        ),
    ]


def write_field_layer(path: str, data: Any, meta: dict) -> list[str]:
    """Write the dense field a Vectors layer carries (npe2 single-layer writer).

    Raises :class:`ValueError` for a Vectors layer without one (napari shows it): its
    arrows alone are a sample of the field, not the field.
    """
    from .core.files.imagefiles import save_field

    md = meta.get("metadata") or {}
    field = md.get(FIELD_KEY)
    if field is None:
        raise ValueError(
            "this Vectors layer holds no displacement field; save the 'displacement' layer "
            "of a registration, or a field opened from a file"
        )
    out = save_field(
        path, np.asarray(field), spacing=md.get(SPACING_KEY), origin=md.get(ORIGIN_KEY)
    )
    return [os.fspath(out)]
