"""B-spline registration by Gauss-Newton over MIND-SSC descriptors: the default refinement.

The network's field is a discrete estimate at stride-4 control points. This module
optimises the pair's field directly, the way elastix does (a cubic B-spline
transform, coarse-to-fine), but with

* a modality-independent similarity: MIND-SSC descriptors (Heinrich et al., MICCAI
  2013) at two neighbour distances, compared by squared differences;
* Gauss-Newton steps instead of stochastic gradient descent: every step solves the
  linearised least-squares problem over all control points at once (a banded,
  symmetric positive definite system, since each pixel touches only 4 x 4 control
  points), so a level converges in 2-5 steps instead of hundreds;
* the symmetric ("efficient second-order minimisation") gradient, the mean of the
  fixed and the warped moving descriptors' gradients, which removes most of the bias
  that the moving gradient alone leaves at convergence;
* a membrane regulariser on the control-point displacements (squared differences of
  neighbours), weighted relative to the data term's curvature so that one setting
  serves every image size and contrast.

Settings: :class:`~napari_discreg.core.config.BSplineConfig`, chosen on validation
pairs by ``benchmarks/tune_bspline.py``. Everything is torch on the padded,
normalised (B, 1, H, W) tensors the network reads; the banded solve runs in SciPy
(LAPACK ``pbsv``) on CPU and as a dense Cholesky solve on other devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .config import BSplineConfig
from .mind import mind_descriptors
from .preprocess import check_tensor_pair

__all__ = [
    "BSplineConfig",
    "bspline_refine",
    "bspline_basis",
    "fit_coefficients",
    "level_factors",
    "level_schedule",
]

_OFFSETS = range(-3, 4)  # control points i and k share pixels when |i - k| <= 3


def _cubic(t: torch.Tensor) -> torch.Tensor:
    a = t.abs()
    inner = 2.0 / 3.0 - a**2 + a**3 / 2.0
    outer = (2.0 - a).clamp(min=0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


def control_grid_size(length: int, spacing: float) -> int:
    """Control points along an axis of ``length`` pixels: positions ``(k - 1) * spacing``
    for ``k = 0 .. n - 1`` cover ``[-spacing, length - 1 + spacing]``."""
    return math.ceil((length - 1) / spacing) + 3


def bspline_basis(
    length: int, spacing: float, n_ctrl: int, factor: int = 1, *, device=None
) -> torch.Tensor:
    """(length, n_ctrl) cubic B-spline weights of a pyramid level's pixels.

    Pixel ``x`` of a level downsampled by ``factor`` (average pooling) sits at
    full-resolution coordinate ``factor * x + (factor - 1) / 2``; control point ``k``
    at ``(k - 1) * spacing``.
    """
    x = torch.arange(length, dtype=torch.float32, device=device) * factor + (factor - 1) / 2
    p = (torch.arange(n_ctrl, dtype=torch.float32, device=device) - 1) * spacing
    return _cubic((x[:, None] - p[None]) / spacing)


def evaluate_field(coeff: torch.Tensor, by: torch.Tensor, bx: torch.Tensor) -> torch.Tensor:
    """Dense field (2, h, w) of control-point displacements (2, ny, nx)."""
    return torch.matmul(torch.matmul(by, coeff), bx.T)


def fit_coefficients(
    field: torch.Tensor, by: torch.Tensor, bx: torch.Tensor, ridge: float = 1e-3
) -> torch.Tensor:
    """Least-squares control-point displacements (2, ny, nx) of a dense field (2, H, W)
    (separable: ``(By^T By)^-1 By^T u Bx (Bx^T Bx)^-1``, with a small ridge)."""
    gy = by.T @ by + ridge * torch.eye(by.shape[1], device=by.device)
    gx = bx.T @ bx + ridge * torch.eye(bx.shape[1], device=bx.device)
    rhs = torch.matmul(torch.matmul(by.T, field), bx)  # (2, ny, nx)
    left = torch.linalg.solve(gy, rhs)  # gy^-1 rhs
    return torch.linalg.solve(gx, left.transpose(1, 2)).transpose(1, 2)


def _pair_products(basis: torch.Tensor) -> torch.Tensor:
    """(7, length, n): ``out[d][:, i] = B[:, i] * B[:, i + d]`` (zero out of range)."""
    n = basis.shape[1]
    out = basis.new_zeros(7, *basis.shape)
    for k, d in enumerate(_OFFSETS):
        lo, hi = max(0, -d), min(n, n - d)
        if hi > lo:
            out[k, :, lo:hi] = basis[:, lo:hi] * basis[:, lo + d : hi + d]
    return out


@lru_cache(maxsize=16)
def _band_layout(ny: int, nx: int):
    """Where each entry of the normal equations goes.

    Unknowns are interleaved, ``p = (i * nx + j) * 2 + axis``, which makes the system
    banded. Returns the (row, col, source) indices of the lower triangle taken from
    the (3 blocks rr/rc/cc, 7, 7, ny, nx) array of curvature terms, the (row, col,
    value) entries of the membrane regulariser, the bandwidth and the size.
    """
    i, j = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    rows, cols, srcs = [], [], []
    for blk, (a, b) in enumerate(((0, 0), (0, 1), (1, 1))):
        for kd, di in enumerate(_OFFSETS):
            for ke, dj in enumerate(_OFFSETS):
                k, m = i + di, j + dj
                ok = (k >= 0) & (k < ny) & (m >= 0) & (m < nx)
                p = ((i * nx + j) * 2 + a)[ok]
                q = ((k * nx + m) * 2 + b)[ok]
                src = (((blk * 7 + kd) * 7 + ke) * ny * nx + i * nx + j)[ok]
                rows += [p, q] if a != b else [p]
                cols += [q, p] if a != b else [q]
                srcs += [src, src] if a != b else [src]
    r, c, s = torch.cat(rows), torch.cat(cols), torch.cat(srcs)
    low = r >= c
    size = 2 * ny * nx
    bandwidth = int((r - c).max())
    lr, lc, lv = [], [], []
    degree = torch.zeros(ny, nx)
    for di, dj in ((1, 0), (0, 1)):
        k, m = i + di, j + dj
        ok = (k < ny) & (m < nx)
        degree[ok] += 1
        degree[k[ok], m[ok]] += 1
        for a in (0, 1):
            lr.append(((k * nx + m) * 2 + a)[ok])
            lc.append(((i * nx + j) * 2 + a)[ok])
            lv.append(-torch.ones(int(ok.sum())))
    for a in (0, 1):
        p = ((i * nx + j) * 2 + a).reshape(-1)
        lr.append(p)
        lc.append(p)
        lv.append(degree.reshape(-1))
    return (r[low], c[low], s[low]), (torch.cat(lr), torch.cat(lc), torch.cat(lv)), bandwidth, size


def _membrane(coeff: torch.Tensor) -> torch.Tensor:
    """Gradient of the membrane energy: the graph Laplacian of (2, ny, nx) coefficients
    (free boundary: a missing neighbour contributes nothing)."""
    out = torch.zeros_like(coeff)
    dr = coeff[:, 1:] - coeff[:, :-1]
    dc = coeff[:, :, 1:] - coeff[:, :, :-1]
    out[:, 1:] += dr
    out[:, :-1] -= dr
    out[:, :, 1:] += dc
    out[:, :, :-1] -= dc
    return out


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences (halved later) of (C, h, w) along rows and columns."""
    p = F.pad(x[None], (1, 1, 1, 1), mode="replicate")[0]
    return p[:, 2:, 1:-1] - p[:, :-2, 1:-1], p[:, 1:-1, 2:] - p[:, 1:-1, :-2]


def _solve(
    curvature: torch.Tensor, gradient: torch.Tensor, weight: float, damping: float, ny: int, nx: int
) -> torch.Tensor:
    """Solve ``(H + weight L + damping I) delta = -g`` for the (2, ny, nx) step."""
    (br, bc, bs), (lr, lc, lv), bw, size = _band_layout(ny, nx)
    rhs = -gradient.permute(1, 2, 0).reshape(-1).double()
    values = curvature.reshape(-1)[bs.to(curvature.device)].double()
    if curvature.device.type == "cpu":
        from scipy.linalg import solveh_banded

        band = torch.zeros(bw + 1, size, dtype=torch.float64)
        band.index_put_((br - bc, bc), values, accumulate=True)
        band.index_put_((lr - lc, lc), weight * lv.double(), accumulate=True)
        band[0] += damping
        with _one_blas_thread():
            step = solveh_banded(band.numpy(), rhs.numpy(), lower=True, check_finite=False)
        delta = torch.from_numpy(step).float()
    else:
        dev = curvature.device
        dense = torch.zeros(size, size, dtype=torch.float64, device=dev)
        dense.index_put_((br.to(dev), bc.to(dev)), values, accumulate=True)
        dense.index_put_((lr.to(dev), lc.to(dev)), weight * lv.double().to(dev), accumulate=True)
        dense = torch.tril(dense) + torch.tril(dense, -1).T
        dense.diagonal().add_(damping)
        delta = torch.cholesky_solve(rhs[:, None], torch.linalg.cholesky(dense))[:, 0].float()
    return delta.view(ny, nx, 2).permute(2, 0, 1).to(gradient.device)


@lru_cache(maxsize=1)
def _threadpools():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _one_blas_thread():
    """Run SciPy's LAPACK on one thread: its OpenBLAS pool spins after each call and
    starves torch's OpenMP threads (measured: 10x slower registrations on 2 cores)."""
    return _threadpools().limit(limits=1, user_api="blas")


def _warp_level(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Backward-warp (C, h, w) by a (2, h, w) field in pixels (bilinear, border)."""
    h, w = image.shape[-2:]
    rows = torch.arange(h, device=image.device, dtype=field.dtype)[:, None]
    cols = torch.arange(w, device=image.device, dtype=field.dtype)[None, :]
    gy = (rows + field[0]) * (2.0 / max(h - 1, 1)) - 1.0
    gx = (cols + field[1]) * (2.0 / max(w - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)[None]
    return F.grid_sample(
        image[None], grid, mode="bilinear", padding_mode="border", align_corners=True
    )[0]


def _descriptors(image: torch.Tensor, config: BSplineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(6, h, w) mean of the MIND-SSC blocks of every dilation, and all blocks (1, 6n, h, w).

    Averaging the blocks keeps both scales' evidence at the cost of one block: as
    accurate as stacking them on the validation pairs and half the warping work.
    """
    blocks = mind_descriptors(image, config.radius, tuple(config.dilations))
    n = len(config.dilations)
    mean = blocks[0] if n == 1 else blocks[0].view(n, 6, *blocks.shape[-2:]).mean(0)
    return mean, blocks


def level_factors(shape: tuple[int, int], config: BSplineConfig) -> list[int]:
    """Pyramid factors coarse to fine, dropping levels smaller than 24 px a side."""
    factors = [2**k for k in reversed(range(config.levels))]
    return [f for f in factors if f == 1 or min(shape) // f >= 24]


def level_schedule(shape: tuple[int, int], config: BSplineConfig) -> list[tuple[int, int]]:
    """``(factor, Gauss-Newton steps)`` of every level that runs, coarse to fine.

    ``config.iterations`` is read from its end (its last entry is the finest level's);
    levels beyond its length repeat its first entry.
    """
    factors = level_factors(shape, config)
    its = list(config.iterations)
    if len(its) < len(factors):
        its = [its[0]] * (len(factors) - len(its)) + its
    return list(zip(factors, its[-len(factors) :], strict=True))


def bspline_refine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial: torch.Tensor | None = None,
    config: BSplineConfig | None = None,
    *,
    descriptors: list | None = None,
    callback: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Register normalised images (B, 1, H, W) by a B-spline field; returns (B, 2, H, W).

    Parameters
    ----------
    fixed, moving : torch.Tensor
        Images on one device, intensities normalised to about [0, 1].
    initial : torch.Tensor, optional
        Starting field (B, 2, H, W) in pixels (the network's); its least-squares
        B-spline fit is the start. Default: zero.
    config : BSplineConfig, optional
    descriptors : list, optional
        When given (and B == 1), receives the full-resolution MIND-SSC blocks of fixed
        and moving, (1, 6 * len(dilations), H, W) each, for reuse (the guard).
    callback : callable, optional
        Called after every Gauss-Newton step (progress; an exception it raises, such as
        a stop request, ends the registration and propagates).

    Returns
    -------
    torch.Tensor
        Fields (B, 2, H, W) in pixels, detached. ``config.iterations`` all zero
        returns the B-spline fit of ``initial``.
    """
    cfg = config or BSplineConfig()
    check_tensor_pair(fixed, moving, initial, caller="bspline_refine")
    b = fixed.shape[0]
    with torch.inference_mode():
        out = [
            _register_one(
                fixed[k : k + 1].float(),
                moving[k : k + 1].float(),
                None if initial is None else initial[k].float(),
                cfg,
                descriptors if b == 1 else None,
                callback,
            )
            for k in range(b)
        ]
    return torch.stack(out)


def _register_one(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial: torch.Tensor | None,
    cfg: BSplineConfig,
    descriptors: list | None = None,
    callback: Callable[[], None] | None = None,
) -> torch.Tensor:
    dev = fixed.device
    h0, w0 = fixed.shape[-2:]
    field = initial  # dense (2, H, W) between levels; None = zero
    for f, n_steps in level_schedule((h0, w0), cfg):
        if n_steps == 0:
            continue
        # the spacing is in the level's pixels: coarse levels solve for fewer control points
        s = float(cfg.spacing) * f
        ny, nx = control_grid_size(h0, s), control_grid_size(w0, s)
        by0, bx0 = bspline_basis(h0, s, ny, device=dev), bspline_basis(w0, s, nx, device=dev)
        coeff = fixed.new_zeros(2, ny, nx) if field is None else fit_coefficients(field, by0, bx0)
        fl = F.avg_pool2d(fixed, f, ceil_mode=True) if f > 1 else fixed
        ml = F.avg_pool2d(moving, f, ceil_mode=True) if f > 1 else moving
        hl, wl = fl.shape[-2:]
        (desc_f, blocks_f), (desc_m, blocks_m) = _descriptors(fl, cfg), _descriptors(ml, cfg)
        if f == 1 and descriptors is not None:
            descriptors[:] = [blocks_f, blocks_m]
        fixed_grads = _gradients(desc_f) if cfg.symmetric else None
        by = bspline_basis(hl, s, ny, f, device=dev)
        bx = bspline_basis(wl, s, nx, f, device=dev)
        pairs_y = _pair_products(by).transpose(1, 2)  # (7, ny, hl)
        pairs_x = _pair_products(bx)  # (7, wl, nx)
        # data term: mean over channels and full-resolution pixels; the level's
        # displacement is the full-resolution one divided by f; gradients are central
        # differences (2 x the derivative), and with ``symmetric`` the sum of two
        norm = f * f / (desc_f.shape[0] * h0 * w0)
        k = 0.25 if cfg.symmetric else 0.5
        weight = None
        for _ in range(n_steps):
            u = evaluate_field(coeff, by, bx) / f
            warped = _warp_level(desc_m, u)
            residual = warped - desc_f
            gr, gc = _gradients(warped)
            if fixed_grads is not None:
                gr, gc = gr + fixed_grads[0], gc + fixed_grads[1]
            curv = torch.stack([(gr * gr).sum(0), (gr * gc).sum(0), (gc * gc).sum(0)])
            curv = curv * (norm * k * k / (f * f))
            grad = torch.stack([(gr * residual).sum(0), (gc * residual).sum(0)])
            grad = grad * (norm * k / f)
            # control-point curvature blocks (3, 7, 7, ny, nx) and gradient (2, ny, nx)
            t = torch.einsum("diy,byx->bdix", pairs_y, curv)
            hess = torch.einsum("bdix,exj->bdeij", t, pairs_x)
            g = torch.matmul(torch.matmul(by.T, grad), bx)
            scale = max(float(hess[0, 3, 3].mean() + hess[2, 3, 3].mean()) / 2, 1e-12)
            if weight is None:  # relative to this grid's data curvature at its first step
                weight = cfg.smoothness * scale
            g = g + weight * _membrane(coeff)
            try:
                step = _solve(hess, g, weight, cfg.damping * scale, ny, nx)
            except (np.linalg.LinAlgError, torch.linalg.LinAlgError):
                break  # not positive definite (e.g. no texture at all): keep the field
            if not torch.isfinite(step).all():
                break
            coeff = coeff + step
            if callback is not None:
                callback()
        field = evaluate_field(coeff, by0, bx0)
    if field is None:
        return fixed.new_zeros(2, h0, w0)
    return field
