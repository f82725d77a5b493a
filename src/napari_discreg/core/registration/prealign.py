"""Pre-alignment: a rigid, similarity or affine transform between two images of any
size and contrast, found before the deformable stage.

Real pairs arrive unaligned: two stained sections of one tissue are rotated (by any
angle, a section may lie upside down), shifted and stretched by tens of pixels, and two
MRI scans differ by a rigid motion. A deformable method with a capture range of a few
pixels needs this step first (as elastix's and ANTs' stage chains run rigid -> affine
-> deformable).

How it is found (:func:`prealign`):

1. *Start.* Both images are turned into "tissue" images, bright on a dark background
   (:func:`tissue_image`: a bright background, as in bright-field histology, is
   inverted). Their foreground masks (Otsu) give the centres of mass and the area ratio,
   i.e. the start's translation and isotropic scale.
2. *Coarse search.* Rotations every ``search_step`` degrees over the full circle (so a
   section upside down is found) are scored at the coarsest level by the MIND-SSC
   distance (Heinrich et al., MICCAI 2013: modality independent).
3. *Multi-resolution optimisation.* The best two starts are optimised by Adam on the
   MIND-SSC distance at the coarsest level (long side 64 px), the better one then at
   128 px: first rigid (angle, translation) or similarity (plus log-scale), then, for
   ``"affine"``, the full 2 x 2 matrix, with a cosine-decayed step size. Finer levels
   do not help: at 256 px and above two stains' textures differ more than a few pixels
   of misalignment do (the real pairs' landmark error grew with a 448 px level), and
   the network's coarse-to-fine passes take over from here.

Coordinates are pixels ``(row, col)``; a transform is a 3 x 3 matrix ``A`` that maps a
fixed pixel to the moving pixel it samples: ``q = A @ (r, c, 1)``. With physical pixel
spacings the optimisation runs in physical units (the fixed image's spacing), so a
stretch is only what the tissue did, not what the scanners' pixels differ by.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .mind import mind_descriptors
from .warp import affine_positions, sample

PREALIGN_MODES: dict[str, str] = {
    "affine": "rotation, translation, scale and shear (the default)",
    "similarity": "rotation, translation and one scale",
    "rigid": "rotation and translation",
    "none": "no pre-alignment: the images share one pixel grid as they are",
}
"""Every pre-alignment mode by name, with a one-line description."""

DEFAULT_PREALIGN = "affine"

MIN_MOTION_PX = 0.5
"""A transform that moves no corner of the fixed image by this many pixels is taken as
no motion: the deformable stage handles sub-pixel offsets, and an unmoved pair keeps
exactly the identity."""

LUMINANCE = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
"""Rec. 709 luminance weights, as ``skimage.color.rgb2gray``."""


@dataclass(frozen=True)
class PrealignSettings:
    """Settings of :func:`prealign` (chosen on the template's synthetic affines and the
    artificial histology set, ``benchmarks/landmarks.py``; never on the real pairs'
    landmarks alone).

    Attributes
    ----------
    sizes : tuple of int
        Long side in pixels of the pyramid's levels, coarse to fine (a level is skipped
        where the image is smaller).
    steps : tuple of int
        Adam steps per level.
    search_step : float
        Degrees between the rotations the coarse search tries (over 360 degrees).
    candidates : int
        How many of the best rotations are optimised at the coarsest level.
    lr : float
        Adam's step size (parameters are in units of about a radian and of half the
        image's extent).
    """

    sizes: tuple[int, ...] = (64, 128)
    steps: tuple[int, ...] = (40, 60)
    search_step: float = 15.0
    candidates: int = 2
    lr: float = 0.03


MIN_GAIN = 0.10
"""A transform is kept only when it lowers the coarsest level's MIND-SSC distance by this
share. On 20 unmoved T1 / T2-like and T1 / PD-like template pairs (128 and 192 px) the
optimised affine is 0.954-1.016 x the identity's distance (it fits noise); on the real
stain pairs 0.57 and 0.78, on BIRL's artificial rigid / affine / elastic pairs 0.06-0.25."""


def to_gray(image: np.ndarray) -> np.ndarray:
    """A 2D image as float32: RGB(A) ``(H, W, 3|4)`` by its luminance (alpha ignored),
    grayscale as it is."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4:
        rgb = arr[..., :3].astype(np.float32)
        return np.ascontiguousarray(rgb @ LUMINANCE)
    return arr


def _border(img: np.ndarray) -> np.ndarray:
    """The pixels of a frame a twentieth of the short side wide."""
    h, w = img.shape
    b = max(1, min(h, w) // 20)
    return np.concatenate(
        [img[:b].ravel(), img[-b:].ravel(), img[:, :b].ravel(), img[:, -b:].ravel()]
    )


def bright_background(image: np.ndarray) -> bool:
    """True when the image's border is brighter than its middle (bright-field
    histology: white glass around stained tissue)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, (1, 99))
    return float(np.median(_border(img))) > (float(lo) + float(hi)) / 2


def tissue_image(image: np.ndarray) -> np.ndarray:
    """The image with a dark background: inverted when its background is bright."""
    img = np.asarray(image, dtype=np.float32)
    if bright_background(img):
        return (float(img.max()) - img).astype(np.float32)
    return img


def foreground(tissue: np.ndarray) -> np.ndarray:
    """Foreground mask of a tissue image (dark background): brighter than the
    background (the border's median) by a fifth of the way to the bright end, after a
    light smoothing. Faint stains count: Otsu would split strong from faint tissue."""
    from scipy import ndimage as ndi

    # a 256th of the long side, but at most a quarter of the short one: the same for
    # every image up to an aspect ratio of 64, and no 1024 px kernel on a 262144 x 16 strip
    # (194 s there before)
    sigma = max(1.0, min(max(tissue.shape) / 256, min(tissue.shape) / 4))
    img = ndi.gaussian_filter(np.asarray(tissue, dtype=np.float32), sigma)
    background = float(np.median(_border(img)))
    top = float(np.percentile(img, 99))
    return img > background + 0.2 * (top - background)


def _moments(tissue: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre of mass (physical, row/col) of the foreground and its physical area."""
    mask = foreground(tissue)
    if mask.sum() < 16:
        mask = np.ones_like(mask)
    rows, cols = np.nonzero(mask)
    centre = np.array([rows.mean(), cols.mean()]) * spacing
    area = float(mask.sum()) * float(np.prod(spacing))
    return centre, area


def _pyramid_image(image: np.ndarray, size: int) -> tuple[torch.Tensor, float]:
    """The image (1, 1, h, w) with its long side at most ``size`` and its factor."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    factor = max(image.shape) / size
    if factor <= 1:
        return t, 1.0
    h = max(8, round(image.shape[0] / factor))
    w = max(8, round(image.shape[1] / factor))
    return F.interpolate(
        t, size=(h, w), mode="bilinear", antialias=True, align_corners=False
    ), factor


def _normalise(t: torch.Tensor) -> torch.Tensor:
    lo = torch.quantile(t.flatten(), 0.01)
    hi = torch.quantile(t.flatten(), 0.99)
    return ((t - lo) / (hi - lo + 1e-8)).clamp(0, 1)


class _Level:
    """One pyramid level: fixed descriptors and the moving image, in physical units."""

    def __init__(self, fixed: np.ndarray, moving: np.ndarray, size: int, sf, sm) -> None:
        ft, self.ff = _pyramid_image(fixed, size)
        # the moving image at about the same physical resolution as the fixed level
        msize = max(
            8,
            round(
                size * max(moving.shape) * float(sm.max()) / (max(fixed.shape) * float(sf.max()))
            ),
        )
        mt, self.fm = _pyramid_image(moving, msize)
        self.fixed = _normalise(ft)
        self.moving = _normalise(mt)
        self.desc_f = mind_descriptors(self.fixed, 1, (2,))
        h, w = ft.shape[-2:]
        # physical positions of the level's pixel centres (full-resolution pixel p at
        # level pixel (p + 0.5) / factor - 0.5)
        rows = (torch.arange(h, dtype=torch.float32) + 0.5) * (fixed.shape[0] / h) - 0.5
        cols = (torch.arange(w, dtype=torch.float32) + 0.5) * (fixed.shape[1] / w) - 0.5
        rr, cc = torch.meshgrid(rows * float(sf[0]), cols * float(sf[1]), indexing="ij")
        self.points = torch.stack([rr.flatten(), cc.flatten()])  # (2, h*w) physical
        self.shape = (h, w)
        self.moving_full = moving.shape
        self.sm = torch.tensor(np.asarray(sm, dtype=np.float32))

    def warped(self, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The moving level sampled at ``matrix @ x + offset`` of the fixed points."""
        q = matrix @ self.points + offset[:, None]  # physical moving positions
        q = q / self.sm[:, None]  # moving full-resolution pixels
        hm, wm = self.moving_full
        gy = (q[0] + 0.5) / hm * 2 - 1
        gx = (q[1] + 0.5) / wm * 2 - 1
        grid = torch.stack([gx, gy], -1).reshape(1, *self.shape, 2)
        return F.grid_sample(
            self.moving, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )

    def cost(self, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        warped = self.warped(matrix, offset)
        desc = mind_descriptors(warped, 1, (2,))
        return ((desc - self.desc_f) ** 2).mean()


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])


SCALE_LR = 0.25
SHEAR_LR = 0.1
"""Adam's step size for the log-scale and for the free 2 x 2 part, relative to the one for
rotation and shift: a free scale lets the MIND-SSC distance shrink the moving tissue."""


class _Params(torch.nn.Module):
    """``x -> M (x - cf) + cm + t`` with ``M = R(theta) * exp(log_scale) + L``: the
    rotation and scale always, ``L`` (a free 2 x 2 update) for the affine stage."""

    def __init__(self, theta: float, log_scale: float, extent: float) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float32))
        self.log_scale = torch.nn.Parameter(torch.tensor(log_scale, dtype=torch.float32))
        self.linear = torch.nn.Parameter(torch.zeros(2, 2))
        self.shift = torch.nn.Parameter(torch.zeros(2))  # in units of ``extent``
        self.extent = extent

    def matrix(self) -> torch.Tensor:
        return _rotation(self.theta) * torch.exp(self.log_scale) + self.linear

    def groups(self, mode: str, lr: float) -> list[dict]:
        """Adam's parameter groups: scale and shear move slower than rotation and shift
        (a free scale lets the MIND-SSC distance shrink the moving tissue away)."""
        params = [{"params": [self.theta, self.shift], "lr": lr}]
        if mode in ("similarity", "affine"):
            params.append({"params": [self.log_scale], "lr": lr * SCALE_LR})
        if mode == "affine":
            params.append({"params": [self.linear], "lr": lr * SHEAR_LR})
        for group in params:
            group["initial_lr"] = group["lr"]
        return params


def _affine(p: _Params, cf: torch.Tensor, cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix, offset) of the physical map fixed -> moving."""
    m = p.matrix()
    offset = cm + p.shift * p.extent - m @ cf
    return m, offset


def _optimise(p: _Params, level: _Level, mode: str, steps: int, lr: float, cf, cm, tick) -> float:
    stages = ["similarity" if mode != "rigid" else "rigid"]
    if mode == "affine":
        stages.append("affine")
    per = [steps // len(stages)] * len(stages)
    per[-1] += steps - sum(per)
    for stage, n in zip(stages, per, strict=True):
        opt = torch.optim.Adam(p.groups(stage, lr))
        for i in range(n):
            # the step size decays to zero (cosine) so that every level ends settled
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * 0.5 * (1 + math.cos(math.pi * i / n))
            opt.zero_grad()
            cost = level.cost(*_affine(p, cf, cm))
            cost.backward()
            opt.step()
            if tick is not None:
                tick()
    with torch.no_grad():
        return float(level.cost(*_affine(p, cf, cm)))


def prealign_steps(settings: PrealignSettings | None = None) -> int:
    """Optimiser steps :func:`prealign` reports through its callback."""
    s = settings or PrealignSettings()
    return s.candidates * s.steps[0] + sum(s.steps[1:])


def prealign(
    fixed: np.ndarray,
    moving: np.ndarray,
    mode: str = DEFAULT_PREALIGN,
    *,
    fixed_spacing=None,
    moving_spacing=None,
    settings: PrealignSettings | None = None,
    callback: Callable[[], None] | None = None,
) -> np.ndarray:
    """The transform (3, 3) that maps fixed pixels ``(r, c, 1)`` to moving pixels.

    Parameters
    ----------
    fixed, moving : ndarray
        2D grayscale images of any sizes (:func:`to_gray` first for RGB), any
        contrast; background polarity is detected (:func:`tissue_image`).
    mode : str
        A key of :data:`PREALIGN_MODES`. ``"none"`` maps each fixed pixel to the moving
        pixel at the same physical position.
    fixed_spacing, moving_spacing : (float, float), optional
        Physical size of a pixel (row, col); default 1.
    settings : PrealignSettings, optional
    callback : callable, optional
        Called after every optimiser step (progress; an exception it raises ends the
        search and propagates).
    """
    if mode not in PREALIGN_MODES:
        raise ValueError(
            f"unknown pre-alignment {mode!r}; choose one of {', '.join(PREALIGN_MODES)}"
        )
    s = settings or PrealignSettings()
    sf = pixel_spacing(fixed_spacing, "fixed_spacing")
    sm = pixel_spacing(moving_spacing, "moving_spacing")
    unmoved = unmoved_matrix(sf, sm)
    if mode == "none":
        return unmoved
    with torch.enable_grad():
        matrix, offset, levels = _search(
            tissue_image(fixed), tissue_image(moving), mode, sf, sm, s, callback
        )
    physical = _homogeneous(matrix, offset)  # physical fixed -> physical moving
    found = np.diag([1 / sm[0], 1 / sm[1], 1.0]) @ physical @ np.diag([sf[0], sf[1], 1.0])
    # keep it only when it moves something and matches better than the images as they lie
    h, w = fixed.shape
    corners = np.array([[0, 0, 1], [0, w - 1, 1], [h - 1, 0, 1], [h - 1, w - 1, 1]], float).T
    if np.abs((found - unmoved) @ corners).max() < MIN_MOTION_PX:
        return unmoved
    # judged where the tissue's outline decides (the coarsest level): at fine levels two
    # stains' textures differ more than a few pixels of motion do (the lung pair at
    # 256 px: 0.1471 aligned vs 0.1477 unaligned, at 33 px median landmark error)
    coarse = levels[0]
    with torch.no_grad():
        still = float(coarse.cost(torch.eye(2), torch.zeros(2)))
        moved = float(
            coarse.cost(torch.from_numpy(matrix).float(), torch.from_numpy(offset).float())
        )
    if moved > (1 - MIN_GAIN) * still:
        return unmoved
    return found


def _homogeneous(matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    out[:2, :2] = matrix
    out[:2, 2] = offset
    return out


def _search(fixed, moving, mode, sf, sm, s: PrealignSettings, callback):
    cf_np, area_f = _moments(fixed, sf)
    cm_np, area_m = _moments(moving, sm)
    cf = torch.tensor(cf_np, dtype=torch.float32)
    cm = torch.tensor(cm_np, dtype=torch.float32)
    log_scale = 0.0 if mode == "rigid" else 0.5 * math.log(area_m / area_f)
    extent = float(max(np.asarray(fixed.shape) * sf)) / 2
    side = max(fixed.shape)
    sizes = [z for z in s.sizes if z < side]
    if side <= max(s.sizes):  # the finest level is the image itself
        sizes.append(side)
    levels = [_Level(fixed, moving, z, sf, sm) for z in sizes]
    steps = list(s.steps)[-len(levels) :] if len(levels) <= len(s.steps) else list(s.steps)
    coarse = levels[0]
    angles = np.arange(0.0, 360.0, s.search_step)
    scores = []
    with torch.no_grad():
        for a in angles:
            p = _Params(math.radians(a), log_scale, extent)
            scores.append(float(coarse.cost(*_affine(p, cf, cm))))
    order = np.argsort(scores)[: s.candidates]
    best = None
    for k in order:
        p = _Params(math.radians(float(angles[k])), log_scale, extent)
        cost = _optimise(p, coarse, mode, steps[0], s.lr, cf, cm, callback)
        if best is None or cost < best[0]:
            best = (cost, p)
    assert best is not None
    p = best[1]
    for level, n in zip(levels[1:], steps[1:], strict=False):
        _optimise(p, level, mode, n, s.lr / 2, cf, cm, callback)
    with torch.no_grad():
        m, o = _affine(p, cf, cm)
    return m.double().numpy(), o.double().numpy(), levels


def pixel_spacing(value, name: str) -> np.ndarray:
    """A physical pixel size (row, col) as float64, default ``(1, 1)``; ``ValueError``
    unless two positive finite numbers."""
    sp = np.asarray(value if value is not None else (1.0, 1.0), dtype=np.float64)
    if sp.shape != (2,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ValueError(
            f"{name} must be two positive finite numbers (row, col), got {sp.tolist()}"
        )
    return sp


def unmoved_matrix(fixed_spacing=None, moving_spacing=None) -> np.ndarray:
    """The pixel map (3, 3) of no motion: each fixed pixel to the moving pixel at the same
    physical position (origins at pixel 0)."""
    sf = pixel_spacing(fixed_spacing, "fixed_spacing")
    sm = pixel_spacing(moving_spacing, "moving_spacing")
    return np.diag([sf[0] / sm[0], sf[1] / sm[1], 1.0])


def resample(image: np.ndarray, matrix, shape: tuple[int, int]) -> np.ndarray:
    """``image`` sampled at ``matrix @ (r, c, 1)`` of every pixel of a grid of ``shape``
    (bilinear, border replicated): e.g. the moving image on the fixed grid."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    with torch.no_grad():
        out = sample(t, affine_positions(matrix, int(shape[0]), int(shape[1])))
    return out[0, 0].numpy()


def describe_affine(matrix) -> str:
    """A short phrase for messages: rotation, scales and shift of a pixel map."""
    a = np.asarray(matrix, dtype=np.float64)
    lin = a[:2, :2]
    # polar decomposition: the rotation nearest to the linear part, then its stretch
    u, sv, vt = np.linalg.svd(lin)
    rot = u @ vt
    angle = math.degrees(math.atan2(rot[1, 0], rot[0, 0]))
    flip = " (mirrored)" if np.linalg.det(lin) < 0 else ""
    return (
        f"rotation {angle:.1f} deg{flip}, scales {sv.max():.3f}/{sv.min():.3f}, "
        f"shift ({a[0, 2]:.1f}, {a[1, 2]:.1f}) px"
    )
