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
(LAPACK ``pbsv``) on the host for every device.

Memory and time are linear in the pixels and in the control points: each pixel's basis
is held as its 4 weights (:class:`_Basis`), never as a dense (pixels x control points)
matrix, and the unknowns are ordered along the grid's longer side, so that the band of
the normal equations spans ``6 x`` the SHORTER side's control points (a 16 x 65536 image
has a band of 38 rows, not 32,800). The band's bytes, ``16 (6 n + 8)`` per control point
with ``n`` the shorter side's control points, are what
:func:`~napari_discreg.core.memory.bspline_bytes` estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..config import BSplineConfig
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


@dataclass(frozen=True)
class _Basis:
    """The cubic B-spline weights of a level's pixels along one axis, kept sparse: pixel
    ``x`` touches control points ``first[x] .. first[x] + width - 1`` with ``weights[x]``
    (the dense (length, n) matrix of :func:`bspline_basis` would grow with the length
    squared: 23 GB for a 262144 px side)."""

    first: torch.Tensor  # (length,) int64
    weights: torch.Tensor  # (length, width) float32
    n: int

    @property
    def width(self) -> int:
        return int(self.weights.shape[1])

    def _shape(self, ndim: int, dim: int) -> list[int]:
        shape = [1] * ndim
        shape[dim] = -1
        return shape

    def expand(self, c: torch.Tensor, dim: int) -> torch.Tensor:
        """Control-point values to pixels along ``dim`` (``B @ c`` along that axis)."""
        shape = self._shape(c.dim(), dim)
        out = c.index_select(dim, self.first) * self.weights[:, 0].view(shape)
        for a in range(1, self.width):
            out += c.index_select(dim, self.first + a) * self.weights[:, a].view(shape)
        return out

    def reduce(self, v: torch.Tensor, dim: int) -> torch.Tensor:
        """Pixel values to control points along ``dim`` (``B^T @ v`` along that axis)."""
        shape = self._shape(v.dim(), dim)
        size = list(v.shape)
        size[dim] = self.n
        out = v.new_zeros(size)
        for a in range(self.width):
            out.index_add_(dim, self.first + a, v * self.weights[:, a].view(shape))
        return out

    def reduce_pairs(self, v: torch.Tensor, dim: int) -> torch.Tensor:
        """``out[d][k] = sum_x B[x, k] B[x, k + d] v[x]`` along ``dim`` for the 7 offsets
        ``d`` of :data:`_OFFSETS`, stacked as a new first axis (``_pair_products``'
        product with ``v``, without the dense matrix)."""
        shape = self._shape(v.dim(), dim)
        size = list(v.shape)
        size[dim] = self.n
        out = v.new_zeros(len(_OFFSETS), *size)
        for a in range(self.width):
            for b in range(self.width):
                wab = (self.weights[:, a] * self.weights[:, b]).view(shape)
                out[b - a + 3].index_add_(dim, self.first + a, v * wab)
        return out

    def gram_band(self, ridge: float) -> np.ndarray:
        """Lower band (width, n) of ``B^T B + ridge I`` in LAPACK's storage, float64."""
        band = torch.zeros(self.width, self.n, dtype=torch.float64)
        first, w = self.first.cpu(), self.weights.cpu().double()
        for a in range(self.width):
            for b in range(a, self.width):
                band[b - a].index_add_(0, first + a, w[:, a] * w[:, b])
        band[0] += ridge
        return band.numpy()


def _basis(length: int, spacing: float, n_ctrl: int, factor: int = 1, *, device=None) -> _Basis:
    """:func:`bspline_basis` as a :class:`_Basis` (the same weights, 4 per pixel)."""
    x = torch.arange(length, dtype=torch.float64, device=device) * factor + (factor - 1) / 2
    t = x / spacing + 1.0  # pixel position in control-point units (point k sits at k)
    width = min(4, n_ctrl)
    first = (torch.floor(t).long() - 1).clamp(0, n_ctrl - width)
    k = first[:, None] + torch.arange(width, device=device)
    weights = _cubic((t[:, None] - k).float())
    return _Basis(first, weights, n_ctrl)


def _evaluate(coeff: torch.Tensor, by: _Basis, bx: _Basis) -> torch.Tensor:
    """:func:`evaluate_field` with sparse bases: (2, ny, nx) -> (2, h, w)."""
    return by.expand(bx.expand(coeff, 2), 1)


def _fit(field: torch.Tensor, by: _Basis, bx: _Basis, ridge: float = 1e-3) -> torch.Tensor:
    """:func:`fit_coefficients` with sparse bases: the separable least-squares fit, its
    two banded Gram systems solved by LAPACK on the host."""
    from scipy.linalg import solveh_banded

    rhs = bx.reduce(by.reduce(field, 1), 2).double().cpu()  # (2, ny, nx)
    ny, nx = by.n, bx.n
    with _one_blas_thread():
        m = rhs.permute(1, 0, 2).reshape(ny, 2 * nx).numpy()
        left = solveh_banded(by.gram_band(ridge), m, lower=True, check_finite=False)
        left = np.ascontiguousarray(left.reshape(ny, 2, nx).transpose(2, 1, 0))  # (nx, 2, ny)
        out = solveh_banded(
            bx.gram_band(ridge), left.reshape(nx, 2 * ny), lower=True, check_finite=False
        )
    coeff = torch.from_numpy(out.reshape(nx, 2, ny)).permute(1, 2, 0)
    return coeff.to(field.device, torch.float32)


def _pair_products(basis: torch.Tensor) -> torch.Tensor:
    """(7, length, n): ``out[d][:, i] = B[:, i] * B[:, i + d]`` (zero out of range)."""
    n = basis.shape[1]
    out = basis.new_zeros(7, *basis.shape)
    for k, d in enumerate(_OFFSETS):
        lo, hi = max(0, -d), min(n, n - d)
        if hi > lo:
            out[k, :, lo:hi] = basis[:, lo:hi] * basis[:, lo + d : hi + d]
    return out


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


def band_rows(ny: int, nx: int) -> int:
    """Rows of the band :func:`_solve` factorises for a (ny, nx) control grid: the
    unknowns run along the longer side, so the band spans the shorter one."""
    return min(6 * min(ny, nx) + 8, 2 * ny * nx)


def _band(hess: torch.Tensor, weight: float, damping: float) -> np.ndarray:
    """The lower band, in LAPACK's storage (Fortran order, float64), of
    ``H + weight L + damping I`` for curvature blocks ``hess`` (3, 7, 7, n0, n1) with
    unknowns ``p = (i * n1 + j) * 2 + axis``.

    Entry ``(p, q)``, ``p >= q``, goes to ``band[p - q, q]``. For a block (axes a, b) and a
    grid offset (di, dj), ``q - p = 2 (di n1 + dj) + b - a`` is the same for every control
    point, so each offset is one strided slice of a band row: no index arrays.
    """
    n0, n1 = hess.shape[-2:]
    size = 2 * n0 * n1
    rows = min(6 * n1 + 8, size)
    out = np.zeros((rows, size), dtype=np.float64, order="F")
    band = torch.from_numpy(out).view(rows, n0, n1, 2)

    def put(d: int, di: int, dj: int, at_source: bool, axis: int, value: torch.Tensor) -> None:
        if d >= rows:
            return
        i0, i1 = max(0, -di), n0 - max(0, di)
        j0, j1 = max(0, -dj), n1 - max(0, dj)
        if i1 <= i0 or j1 <= j0:
            return
        src = value[i0:i1, j0:j1]
        if at_source:
            band[d, i0:i1, j0:j1, axis] += src
        else:
            band[d, i0 + di : i1 + di, j0 + dj : j1 + dj, axis] += src

    for blk, (a, b) in enumerate(((0, 0), (0, 1), (1, 1))):
        for kd, di in enumerate(_OFFSETS):
            for ke, dj in enumerate(_OFFSETS):
                s = di * n1 + dj  # the target's grid position minus the source's
                value = hess[blk, kd, ke]
                if a == b:
                    if s <= 0:  # the mirror entry (s > 0) is the upper triangle
                        put(-2 * s, di, dj, False, b, value)
                elif s < 0:  # source axis 0 below the target's axis 1
                    put(-2 * s - 1, di, dj, False, b, value)
                else:
                    put(2 * s + 1, di, dj, True, a, value)
    # the membrane: graph Laplacian of the 4-neighbour grid, on both axes
    degree = torch.zeros(n0, n1, dtype=torch.float64)
    degree[1:] += 1
    degree[:-1] += 1
    degree[:, 1:] += 1
    degree[:, :-1] += 1
    band[0] += (weight * degree + damping)[..., None]
    if 2 * n1 < rows:
        band[2 * n1, :-1] -= weight
    if 2 < rows:
        band[2, :, :-1] -= weight
    return out


def _solve(
    curvature: torch.Tensor, gradient: torch.Tensor, weight: float, damping: float, ny: int, nx: int
) -> torch.Tensor:
    """Solve ``(H + weight L + damping I) delta = -g`` for the (2, ny, nx) step.

    On every device the (3, 7, 7, ny, nx) curvature blocks go to the host and LAPACK's
    banded Cholesky (``pbsv``) solves the system: its band holds ``band_rows(ny, nx)``
    x ``2 ny nx`` float64 values (the dense matrix a GPU solve would need holds
    ``(2 ny nx)^2``: 29 GB at 2048 px with spacing 12). The unknowns run along the
    grid's longer side, so the band spans the shorter one.
    """
    from scipy.linalg import solveh_banded

    hess = curvature.detach().to("cpu", torch.float64)
    grad = gradient.detach().to("cpu", torch.float64)
    transposed = nx > ny
    if transposed:  # order the unknowns column by column
        hess, grad = hess.permute(0, 2, 1, 4, 3), grad.transpose(1, 2)
    rhs = (-grad).permute(1, 2, 0).reshape(-1).numpy().copy()
    band = _band(hess, weight, damping)
    with _one_blas_thread():
        step = solveh_banded(
            band, rhs, lower=True, overwrite_ab=True, overwrite_b=True, check_finite=False
        )
    n0, n1 = hess.shape[-2:]
    delta = torch.from_numpy(step).float().view(n0, n1, 2).permute(2, 0, 1)
    if transposed:
        delta = delta.transpose(1, 2)
    return delta.contiguous().to(gradient.device)


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
        by0, bx0 = _basis(h0, s, ny, device=dev), _basis(w0, s, nx, device=dev)
        coeff = fixed.new_zeros(2, ny, nx) if field is None else _fit(field, by0, bx0)
        fl = F.avg_pool2d(fixed, f, ceil_mode=True) if f > 1 else fixed
        ml = F.avg_pool2d(moving, f, ceil_mode=True) if f > 1 else moving
        hl, wl = fl.shape[-2:]
        (desc_f, blocks_f), (desc_m, blocks_m) = _descriptors(fl, cfg), _descriptors(ml, cfg)
        if f == 1 and descriptors is not None:
            descriptors[:] = [blocks_f, blocks_m]
        fixed_grads = _gradients(desc_f) if cfg.symmetric else None
        by, bx = _basis(hl, s, ny, f, device=dev), _basis(wl, s, nx, f, device=dev)
        # data term: mean over channels and full-resolution pixels; the level's
        # displacement is the full-resolution one divided by f; gradients are central
        # differences (2 x the derivative), and with ``symmetric`` the sum of two
        norm = f * f / (desc_f.shape[0] * h0 * w0)
        k = 0.25 if cfg.symmetric else 0.5
        weight = None
        for _ in range(n_steps):
            u = _evaluate(coeff, by, bx) / f
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
            t = by.reduce_pairs(curv, 1).transpose(0, 1)  # (3, 7, ny, wl)
            hess = bx.reduce_pairs(t, 3).permute(1, 2, 0, 3, 4)  # (3, 7, 7, ny, nx)
            g = bx.reduce(by.reduce(grad, 1), 2)
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
        field = _evaluate(coeff, by0, bx0)
    if field is None:
        return fixed.new_zeros(2, h0, w0)
    return field
