"""Landmarks: the target registration error (TRE) of a registration, and which Points
layer holds an image's landmarks.

Pure NumPy (no Qt, no napari), so that it can move to ``core``. Conventions are the
registration's: points are ``(row, col)`` pixel coordinates of their own image, point
``i`` of the fixed landmarks corresponds to point ``i`` of the moving ones, and the field
``u`` ``(2, H, W)`` lives on the fixed grid in moving pixels, so a fixed point ``x`` maps
to ``x + u(x)`` in the moving image (sampled bilinearly, the border value outside, as the
warp does).

* before: ``|x_fixed - x_moving|`` (the points as they are, each in its own image's pixels);
* after: ``|x_fixed + u(x_fixed) - x_moving|``.

Both are measured in moving pixels; with a ``spacing`` (the moving layer's physical pixel
size, row and col) they are also given in physical units.
"""

from __future__ import annotations

import numpy as np

#: the word after an image's name in the name of its landmarks layer (auto-fill)
LANDMARK_SUFFIXES = ("landmarks", "points")


def as_points(points, what: str = "landmarks") -> np.ndarray:
    """``points`` as a float64 ``(n, 2)`` array (ValueError otherwise)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{what} must be (n, 2) (row, col) points, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{what} hold non-finite coordinates")
    return pts


def sample_bilinear(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear samples ``(n, 2)`` of a ``(2, H, W)`` field at ``(n, 2)`` (row, col)
    points; outside the grid, the value at the nearest border (clamped coordinates)."""
    field = np.asarray(field, dtype=np.float64)
    pts = as_points(points, "points")
    _, h, w = field.shape
    r = np.clip(pts[:, 0], 0.0, h - 1.0)
    c = np.clip(pts[:, 1], 0.0, w - 1.0)
    r0 = np.minimum(np.floor(r).astype(int), max(h - 2, 0))
    c0 = np.minimum(np.floor(c).astype(int), max(w - 2, 0))
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (r - r0)[None], (c - c0)[None]
    top = field[:, r0, c0] * (1 - fc) + field[:, r0, c1] * fc
    bottom = field[:, r1, c0] * (1 - fc) + field[:, r1, c1] * fc
    return (top * (1 - fr) + bottom * fr).T


def landmark_errors(
    fixed_points, moving_points, displacement=None, *, spacing=None
) -> dict[str, np.ndarray]:
    """Per-landmark errors: ``{"before": (n,), "after": (n,)}`` in moving pixels, and with
    ``spacing`` (row, col) also ``"before_physical"``, ``"after_physical"``.

    ``"after"`` is there only with a ``displacement`` (2, H, W) on the fixed grid.
    """
    fixed = as_points(fixed_points, "fixed landmarks")
    moving = as_points(moving_points, "moving landmarks")
    if len(fixed) != len(moving):
        raise ValueError(
            f"the landmarks do not correspond: {len(fixed)} fixed and {len(moving)} moving "
            "points (point i of one layer must match point i of the other)"
        )
    if len(fixed) == 0:
        raise ValueError("there are no landmarks to compare")
    vectors = {"before": moving - fixed}
    if displacement is not None:
        vectors["after"] = moving - (fixed + sample_bilinear(displacement, fixed))
    out = {key: np.hypot(v[:, 0], v[:, 1]) for key, v in vectors.items()}
    if spacing is not None:
        s = np.asarray(spacing, dtype=np.float64).reshape(-1)[-2:]
        for key, v in vectors.items():
            out[f"{key}_physical"] = np.hypot(v[:, 0] * s[0], v[:, 1] * s[1])
    return out


def tre_summary(fixed_points, moving_points, displacement, *, spacing=None, unit=None) -> dict:
    """The TRE before and after a registration, as the widget reports it.

    Returns ``{"landmarks": n, "px": {"before": {"median", "mean"}, "after": {...}},
    "robustness": share of landmarks closer after than before}`` and, with ``spacing``
    (the moving image's physical pixel size, row and col) that is not (1, 1), also
    ``"physical": {...}`` (same layout) and ``"unit"``. Plain floats: it goes into layer
    metadata.
    """
    errors = landmark_errors(fixed_points, moving_points, displacement, spacing=spacing)

    def stats(values: np.ndarray) -> dict[str, float]:
        return {"median": float(np.median(values)), "mean": float(np.mean(values))}

    out: dict = {
        "landmarks": int(errors["before"].size),
        "px": {"before": stats(errors["before"]), "after": stats(errors["after"])},
        "robustness": float(np.mean(errors["after"] < errors["before"])),
        "meaning": "before: |x_fixed - x_moving|; after: |x_fixed + u(x_fixed) - x_moving| "
        "(moving pixels; point i of the fixed landmarks matches point i of the moving ones)",
    }
    if spacing is not None and not np.allclose(np.asarray(spacing, float)[-2:], 1.0):
        out["physical"] = {
            "before": stats(errors["before_physical"]),
            "after": stats(errors["after_physical"]),
        }
        out["spacing"] = [float(v) for v in np.asarray(spacing, float)[-2:]]
        out["unit"] = str(unit) if unit else "scale units"
    return out


def format_tre(summary: dict) -> str:
    """One line for the status: ``TRE (78 landmarks): median 22.1 -> 3.4 px, mean ...``."""
    px = summary["px"]
    text = (
        f"TRE ({summary['landmarks']} landmarks): median {px['before']['median']:.2f} → "
        f"{px['after']['median']:.2f} px, mean {px['before']['mean']:.2f} → "
        f"{px['after']['mean']:.2f} px"
    )
    if "physical" in summary:
        ph, unit = summary["physical"], summary["unit"]
        text += f" (median {ph['before']['median']:.3g} → {ph['after']['median']:.3g} {unit})"
    return text


def matching_landmarks(image_name: str | None, candidates):
    """The layer of ``candidates`` (objects with a ``name``) that holds the landmarks of
    the image called ``image_name``: named ``"<image> landmarks"`` (or ``"<image> points"``,
    case-insensitive), or None."""
    if not image_name:
        return None
    wanted = {f"{image_name} {suffix}".lower() for suffix in LANDMARK_SUFFIXES}
    for layer in candidates:
        if layer.name.lower() in wanted:
            return layer
    return None
