"""Discrepancies between the two classifier heads' label histograms (METHOD.md section 3).

Every discrepancy ``d(p1, p2)`` compares two tensors of per-control-point probability
histograms over the ``K x K`` displacement labels, shape ``(..., K, K)`` with the row
displacement on the first of the two last axes (see :mod:`napari_discreg.core.labels`).
The leading dimensions may be anything: ``(N, K, K)``, ``(B, h, w, K, K)`` or just
``(K, K)`` for a single control point. All functions work for any floating dtype and
device and are differentiable with respect to both inputs.

Three discrepancies are provided, each as a plain function and a thin
:class:`torch.nn.Module` wrapper (in the style of kornia's losses):

* :func:`l1` / :class:`L1Discrepancy`: the mean absolute difference of the bins, as in
  Maximum Classifier Discrepancy (Saito et al., CVPR 2018). Labels are unordered
  classes: one bin off costs as much as five bins off.
* :func:`sliced_wasserstein` / :class:`SlicedWasserstein`: the sliced Wasserstein
  discrepancy of Lee et al. (CVPR 2019). The ``N`` histograms of each head are a point
  cloud in ``R^(K^2)``; both clouds are projected onto random unit directions and the
  sorted projections compared. Also blind to the geometry of the label grid.
* :func:`projected_emd` / :class:`ProjectedEMD`: the projected Earth Mover's
  discrepancy of Heinrich & Hansen (MIDL 2020). Each 2D histogram is projected onto 1D
  axes (row and column marginals, optionally the two diagonals) and the 1D
  Wasserstein-1 distance between the heads is computed per projection from cumulative
  sums. A head that is one bin off costs one fifth of a head that is five bins off.

:class:`Discrepancy` names them, and :func:`discrepancy_fn` turns a name into a
callable ``d(p1, p2) -> Tensor``.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "Discrepancy",
    "L1Discrepancy",
    "ProjectedEMD",
    "SlicedWasserstein",
    "discrepancy_fn",
    "emd_1d",
    "histogram_projections",
    "l1",
    "projected_emd",
    "random_directions",
    "sliced_wasserstein",
]

_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------


def _check_histogram(p: Tensor, name: str) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}.")
    if not p.is_floating_point():
        raise TypeError(f"{name} must have a real floating dtype, got {p.dtype}.")
    if p.dim() < 2:
        raise ValueError(
            f"{name} must have shape (..., K, K) with at least 2 dimensions, "
            f"got shape {tuple(p.shape)}."
        )
    if p.shape[-1] != p.shape[-2]:
        raise ValueError(
            f"{name} must have a square label grid (..., K, K) in its last two dimensions, "
            f"got shape {tuple(p.shape)}."
        )


def _check_pair(p1: Tensor, p2: Tensor) -> None:
    _check_histogram(p1, "p1")
    _check_histogram(p2, "p2")
    if p1.shape != p2.shape:
        raise ValueError(
            f"p1 and p2 must have the same shape, got {tuple(p1.shape)} and {tuple(p2.shape)}."
        )
    if p1.device != p2.device:
        raise ValueError(f"p1 and p2 must be on the same device, got {p1.device} and {p2.device}.")


def _check_reduction(reduction: str, allowed: tuple[str, ...] = _REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}.")


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


# ----------------------------------------------------------------------------------------
# L1 (MCD)
# ----------------------------------------------------------------------------------------


def l1(p1: Tensor, p2: Tensor, *, reduction: str = "mean") -> Tensor:
    """Mean absolute difference of the label bins (the MCD discrepancy).

    Parameters
    ----------
    p1, p2 : Tensor
        Label histograms of the two heads, shape ``(..., K, K)``, same shape.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"none"`` returns one value per control point (shape ``p1.shape[:-2]``), each
        the mean of ``|p1 - p2|`` over the ``K * K`` bins; ``"mean"`` and ``"sum"``
        average or add those per-point values.

    Returns
    -------
    Tensor
        A scalar, or the per-point values for ``reduction="none"``.

    Raises
    ------
    ValueError
        If the shapes differ or are not ``(..., K, K)``, or ``reduction`` is unknown.

    Examples
    --------
    >>> p = torch.zeros(2, 3, 3); p[:, 0, 0] = 1
    >>> q = torch.zeros(2, 3, 3); q[:, 0, 1] = 1
    >>> l1(p, q)
    tensor(0.2222)
    """
    _check_pair(p1, p2)
    _check_reduction(reduction)
    per_point = (p1 - p2).abs().flatten(-2).mean(-1)
    return _reduce(per_point, reduction)


# ----------------------------------------------------------------------------------------
# Sliced Wasserstein (Lee et al., CVPR 2019)
# ----------------------------------------------------------------------------------------


def random_directions(
    dim: int,
    num_projections: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random unit vectors in ``R^dim``, as the columns of a ``(dim, num_projections)`` matrix.

    The directions are drawn in float64 on the generator's device (CPU unless a generator
    on another device is given) and only then cast and moved, so the same seed gives the
    same directions for every dtype and device.

    Parameters
    ----------
    dim : int
        Dimension of the space (``K * K`` for label histograms).
    num_projections : int
        Number of directions ``M``.
    generator : torch.Generator, optional
        Source of randomness; it is advanced by the draw. Mutually exclusive with ``seed``.
    seed : int, optional
        Seed of a fresh generator, used when ``generator`` is None; 0 when both are None.
    device, dtype
        Device and dtype of the returned matrix.

    Returns
    -------
    Tensor
        Shape ``(dim, num_projections)``, every column of unit Euclidean norm.
    """
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both.")
    if int(num_projections) < 1:
        raise ValueError(f"num_projections must be a positive integer, got {num_projections}.")
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0 if seed is None else int(seed))
    directions = torch.randn(
        dim, int(num_projections), generator=generator, device=generator.device, dtype=torch.float64
    )
    directions = directions / directions.norm(dim=0, keepdim=True)
    return directions.to(device=device, dtype=dtype)


def sliced_wasserstein(
    p1: Tensor,
    p2: Tensor,
    *,
    num_projections: int = 128,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Sliced Wasserstein discrepancy between the two heads (Lee et al., CVPR 2019).

    Both inputs are flattened to point clouds of shape ``(N, K^2)`` (``N`` = product of
    the leading dimensions), projected onto ``M`` random unit directions in ``R^(K^2)``,
    the ``N`` projected values are sorted per direction and the mean squared difference
    of the sorted values is returned. The discrepancy compares the two clouds as a
    whole, so there is no per-point value.

    Parameters
    ----------
    p1, p2 : Tensor
        Label histograms of the two heads, shape ``(..., K, K)``, same shape.
    num_projections : int, default 128
        Number of random directions ``M``.
    generator : torch.Generator, optional
        Source of the directions (advanced by each call). Mutually exclusive with ``seed``.
    seed : int, optional
        Seed for the directions when no generator is given. With neither, seed 0 is used,
        so the function is deterministic by default.
    reduction : {"mean"}, default "mean"
        Only ``"mean"`` is supported (accepted so that all discrepancies share the
        keyword); anything else raises ``ValueError``.

    Returns
    -------
    Tensor
        A scalar, in the result dtype of ``p1`` and ``p2``.

    Raises
    ------
    ValueError
        On bad shapes, on ``reduction != "mean"``, on ``num_projections < 1`` or when
        both ``generator`` and ``seed`` are given.
    """
    _check_pair(p1, p2)
    if reduction != "mean":
        raise ValueError(
            f"sliced_wasserstein compares the whole set of control points and only supports "
            f"reduction='mean', got {reduction!r}."
        )
    k2 = p1.shape[-1] * p1.shape[-2]
    dtype = torch.result_type(p1, p2)
    directions = random_directions(
        k2, num_projections, generator=generator, seed=seed, device=p1.device, dtype=dtype
    )
    proj1 = p1.reshape(-1, k2).to(dtype) @ directions  # (N, M)
    proj2 = p2.reshape(-1, k2).to(dtype) @ directions
    sorted1 = torch.sort(proj1, dim=0).values
    sorted2 = torch.sort(proj2, dim=0).values
    return (sorted1 - sorted2).square().mean()


# ----------------------------------------------------------------------------------------
# Projected Earth Mover's discrepancy (Heinrich & Hansen, MIDL 2020)
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _diagonal_matrix(k: int, anti: bool) -> Tensor:
    """(K^2, 2K - 1) 0/1 matrix that sums bin ``(i, j)`` into diagonal bin ``i -/+ j``."""
    rows = torch.arange(k).view(k, 1)
    cols = torch.arange(k).view(1, k)
    index = (rows + cols if anti else rows - cols + (k - 1)).flatten()
    return torch.nn.functional.one_hot(index, 2 * k - 1).to(torch.float64)


def _project_diagonal(p: Tensor, anti: bool) -> Tensor:
    # a matrix product, not scatter_add: several times faster on CPU, forward and backward
    matrix = _diagonal_matrix(p.shape[-1], anti).to(device=p.device, dtype=p.dtype)
    return p.flatten(-2) @ matrix


def histogram_projections(p: Tensor, *, diagonals: bool = False) -> tuple[Tensor, ...]:
    """1D projections of label histograms ``(..., K, K)``.

    Parameters
    ----------
    p : Tensor
        Histograms, shape ``(..., K, K)``, row displacement on axis -2.
    diagonals : bool, default False
        Also return the two diagonal projections.

    Returns
    -------
    tuple of Tensor
        ``(rows, cols)``, each ``(..., K)``: the row marginal ``p.sum(-1)`` (distribution
        of the row displacement) and the column marginal ``p.sum(-2)``. With
        ``diagonals=True`` also ``(diag, anti)``, each ``(..., 2K - 1)``: the mass of bin
        ``(i, j)`` goes to bin ``i - j + K - 1`` of ``diag`` (projection onto the
        direction ``(1, -1)``) and to bin ``i + j`` of ``anti`` (direction ``(1, 1)``),
        so both are ordered 1D histograms on unit-spaced bins.
    """
    _check_histogram(p, "p")
    projections: tuple[Tensor, ...] = (p.sum(-1), p.sum(-2))
    if diagonals:
        projections += (_project_diagonal(p, anti=False), _project_diagonal(p, anti=True))
    return projections


def emd_1d(u: Tensor, v: Tensor) -> Tensor:
    """Earth Mover's distance (Wasserstein-1, in bin units) of 1D histograms ``(..., B)``.

    Computed as ``sum_b |U_b - V_b|`` with ``U``, ``V`` the cumulative sums over the last
    axis. For histograms of equal total mass this is exactly W1 on the bin indices
    ``0 .. B-1``; for normalised histograms it is at most ``B - 1``.

    Parameters
    ----------
    u, v : Tensor
        Histograms with the same shape ``(..., B)``.

    Returns
    -------
    Tensor
        Shape ``u.shape[:-1]``.
    """
    if u.shape != v.shape or u.dim() < 1:
        raise ValueError(
            f"u and v must have the same shape (..., B), got {tuple(u.shape)} and {tuple(v.shape)}."
        )
    return (u.cumsum(-1) - v.cumsum(-1)).abs().sum(-1)


def projected_emd(
    p1: Tensor, p2: Tensor, *, diagonals: bool = False, reduction: str = "mean"
) -> Tensor:
    """Projected Earth Mover's discrepancy between the two heads (Heinrich & Hansen 2020).

    For every control point, both 2D histograms are projected onto 1D (row and column
    marginals; with ``diagonals=True`` also the diagonal and anti-diagonal projections,
    ``2K - 1`` bins each, see :func:`histogram_projections`), and the 1D Earth Mover's
    distance is computed per projection as the L1 distance between the cumulative sums
    (:func:`emd_1d`, W1 in bin units). The per-point value is the mean over the
    projections. Cost ``O(N K^2)``.

    For normalised histograms each marginal term is at most ``K - 1`` and each diagonal
    term at most ``2K - 2``, so the per-point value is at most ``K - 1`` without and
    ``1.5 (K - 1)`` with diagonals. A one-hot head that is ``s`` bins off along one axis
    costs ``s / 2`` (marginals only): the discrepancy respects the label geometry.

    Parameters
    ----------
    p1, p2 : Tensor
        Label histograms of the two heads, shape ``(..., K, K)``, same shape.
    diagonals : bool, default False
        Add the two diagonal projections to the two marginals.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"none"`` returns one value per control point (shape ``p1.shape[:-2]``);
        ``"mean"`` and ``"sum"`` average or add them.

    Returns
    -------
    Tensor
        A scalar, or the per-point values for ``reduction="none"``.

    Raises
    ------
    ValueError
        If the shapes differ or are not ``(..., K, K)``, or ``reduction`` is unknown.

    Examples
    --------
    >>> p = torch.zeros(1, 7, 7); p[0, 3, 0] = 1
    >>> q = torch.zeros(1, 7, 7); q[0, 3, 5] = 1
    >>> projected_emd(p, q)  # 5 bins apart along the columns: (0 + 5) / 2
    tensor(2.5000)
    """
    _check_pair(p1, p2)
    _check_reduction(reduction)
    proj1 = histogram_projections(p1, diagonals=diagonals)
    proj2 = histogram_projections(p2, diagonals=diagonals)
    per_point = torch.stack([emd_1d(a, b) for a, b in zip(proj1, proj2, strict=True)]).mean(0)
    return _reduce(per_point, reduction)


# ----------------------------------------------------------------------------------------
# names and factory
# ----------------------------------------------------------------------------------------


class Discrepancy(str, enum.Enum):
    """Names of the discrepancies: ``"l1"``, ``"swd"`` and ``"pemd"``."""

    L1 = "l1"
    SWD = "swd"
    PEMD = "pemd"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str | Discrepancy) -> Discrepancy:
        """Member for a member, a value or an alias, case-insensitively.

        Accepted: ``"l1"``, ``"mcd"``; ``"swd"``, ``"sliced_wasserstein"``; ``"pemd"``,
        ``"projected_emd"``, ``"emd"`` (``-`` and spaces count as ``_``), and the member
        names ``"L1"``, ``"SWD"``, ``"PEMD"``.

        Raises
        ------
        ValueError
            For anything else, listing the valid names.
        """
        if isinstance(name, cls):
            return name
        if isinstance(name, str):
            key = name.strip().lower().replace("-", "_").replace(" ", "_")
            if key in _ALIASES:
                return cls(_ALIASES[key])
        valid = ", ".join(repr(a) for a in _ALIASES)
        raise ValueError(f"unknown discrepancy {name!r}; valid names are {valid}.")


_ALIASES: dict[str, str] = {
    "l1": "l1",
    "mcd": "l1",
    "swd": "swd",
    "sliced_wasserstein": "swd",
    "pemd": "pemd",
    "projected_emd": "pemd",
    "emd": "pemd",
}

_FUNCTIONS: dict[Discrepancy, Callable[..., Tensor]] = {
    Discrepancy.L1: l1,
    Discrepancy.SWD: sliced_wasserstein,
    Discrepancy.PEMD: projected_emd,
}


def discrepancy_fn(kind: str | Discrepancy, **kwargs) -> Callable[[Tensor, Tensor], Tensor]:
    """The discrepancy function named ``kind``, with keyword arguments bound.

    Parameters
    ----------
    kind : str or Discrepancy
        Anything :meth:`Discrepancy.parse` accepts.
    **kwargs
        Keyword arguments of the function (e.g. ``diagonals=True`` for pEMD,
        ``num_projections=64, seed=1`` for SWD, ``reduction="none"``).

    Returns
    -------
    Callable[[Tensor, Tensor], Tensor]
        ``d(p1, p2)``.

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    TypeError
        For a keyword the function does not take (checked now, not at the first call).

    Examples
    --------
    >>> d = discrepancy_fn("emd", diagonals=True)
    >>> p = torch.full((4, 5, 5), 1 / 25)
    >>> d(p, p)
    tensor(0.)
    """
    fn = _FUNCTIONS[Discrepancy.parse(kind)]
    inspect.signature(fn).bind(None, None, **kwargs)  # TypeError on unknown keywords
    return functools.partial(fn, **kwargs)


# ----------------------------------------------------------------------------------------
# nn.Module wrappers
# ----------------------------------------------------------------------------------------


class L1Discrepancy(nn.Module):
    """Module form of :func:`l1`.

    Parameters
    ----------
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction

    def forward(self, p1: Tensor, p2: Tensor) -> Tensor:
        return l1(p1, p2, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class SlicedWasserstein(nn.Module):
    """Module form of :func:`sliced_wasserstein`.

    Parameters
    ----------
    num_projections : int, default 128
        Number of random directions.
    seed : int, default 0
        Seed of the directions.
    resample : bool, default False
        False: every call uses the same directions (those of ``seed``), so the module is
        a fixed function. True: the module owns a CPU generator seeded with ``seed`` and
        draws fresh directions at every call, as in Lee et al.; the sequence is still
        reproducible.
    """

    def __init__(
        self, num_projections: int = 128, seed: int = 0, *, resample: bool = False
    ) -> None:
        super().__init__()
        if int(num_projections) < 1:
            raise ValueError(f"num_projections must be a positive integer, got {num_projections}.")
        self.num_projections = int(num_projections)
        self.seed = int(seed)
        self.resample = bool(resample)
        self._generator: torch.Generator | None = None
        if self.resample:
            self._generator = torch.Generator(device="cpu")
            self._generator.manual_seed(self.seed)

    def forward(self, p1: Tensor, p2: Tensor) -> Tensor:
        if self._generator is not None:
            return sliced_wasserstein(
                p1, p2, num_projections=self.num_projections, generator=self._generator
            )
        return sliced_wasserstein(p1, p2, num_projections=self.num_projections, seed=self.seed)

    def extra_repr(self) -> str:
        return f"num_projections={self.num_projections}, seed={self.seed}, resample={self.resample}"


class ProjectedEMD(nn.Module):
    """Module form of :func:`projected_emd`.

    Parameters
    ----------
    diagonals : bool, default False
        Add the two diagonal projections to the two marginals.
    reduction : {"mean", "sum", "none"}, default "mean"
    """

    def __init__(self, diagonals: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.diagonals = bool(diagonals)
        self.reduction = reduction

    def forward(self, p1: Tensor, p2: Tensor) -> Tensor:
        return projected_emd(p1, p2, diagonals=self.diagonals, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"diagonals={self.diagonals}, reduction={self.reduction!r}"
