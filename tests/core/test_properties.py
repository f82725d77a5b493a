"""Property-based tests (hypothesis) of the core numerics."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_discreg.core.discrepancy import (
    emd_1d,
    histogram_projections,
    l1,
    projected_emd,
    sliced_wasserstein,
)

# =======================================================================================
# Discrepancies (napari_discreg.core.discrepancy)
# =======================================================================================

DISCREPANCY_SETTINGS = settings(max_examples=60, deadline=None)


def _normalise(array: np.ndarray) -> torch.Tensor:
    """Non-negative array (N, K, K) -> normalised histograms.

    Histograms of (near) zero mass, including all-subnormal ones, become uniform.
    """
    p = torch.from_numpy(array)
    mass = p.sum((-1, -2), keepdim=True)
    ok = mass > 1e-12
    return torch.where(ok, p / torch.where(ok, mass, 1.0), torch.full_like(p, 1.0 / p[0].numel()))


@st.composite
def histogram_pairs(draw, count: int = 2):
    """``count`` float64 histogram tensors of one shape (N, K, K), N in 1..5, K in 2..7.

    Entries are drawn from [0, 1] (hypothesis favours 0 and 1, so sparse and one-hot
    histograms are common) and each histogram is normalised to unit mass.
    """
    n = draw(st.integers(1, 5))
    k = draw(st.integers(2, 7))
    elements = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False, width=64)
    return tuple(
        _normalise(draw(hnp.arrays(np.float64, (n, k, k), elements=elements))) for _ in range(count)
    )


def _all_discrepancies(p: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "l1": l1(p, q, reduction="none"),
        "pemd": projected_emd(p, q, reduction="none"),
        "pemd_diag": projected_emd(p, q, diagonals=True, reduction="none"),
        "swd": sliced_wasserstein(p, q, num_projections=16, seed=0),
    }


@DISCREPANCY_SETTINGS
@given(histogram_pairs())
def test_discrepancies_non_negative(pair):
    for name, value in _all_discrepancies(*pair).items():
        assert torch.isfinite(value).all(), name
        assert (value >= 0).all(), name


@DISCREPANCY_SETTINGS
@given(histogram_pairs())
def test_discrepancies_symmetric(pair):
    p, q = pair
    forward, backward = _all_discrepancies(p, q), _all_discrepancies(q, p)
    for name in forward:
        torch.testing.assert_close(forward[name], backward[name], atol=1e-12, rtol=0, msg=name)


@DISCREPANCY_SETTINGS
@given(histogram_pairs(count=1))
def test_discrepancies_zero_on_equal_inputs(single):
    (p,) = single
    for name, value in _all_discrepancies(p, p.clone()).items():
        assert (value == 0).all(), name


@DISCREPANCY_SETTINGS
@given(histogram_pairs())
def test_pemd_bounded_per_projection(pair):
    p, q = pair
    k = p.shape[-1]
    eps = 1e-9
    terms = [
        emd_1d(a, b)
        for a, b in zip(
            histogram_projections(p, diagonals=True),
            histogram_projections(q, diagonals=True),
            strict=True,
        )
    ]
    # row and column marginals: at most K - 1 bins of transport
    assert (terms[0] <= k - 1 + eps).all() and (terms[1] <= k - 1 + eps).all()
    # diagonal projections have 2K - 1 bins: at most 2K - 2
    assert (terms[2] <= 2 * k - 2 + eps).all() and (terms[3] <= 2 * k - 2 + eps).all()
    assert (projected_emd(p, q, reduction="none") <= k - 1 + eps).all()
    assert (projected_emd(p, q, diagonals=True, reduction="none") <= 1.5 * (k - 1) + eps).all()
    # L1 is a mean of |p - q| over K^2 bins of unit-mass histograms: at most 2 / K^2
    assert (l1(p, q, reduction="none") <= 2.0 / k**2 + eps).all()


@DISCREPANCY_SETTINGS
@given(histogram_pairs(count=3))
def test_pemd_and_l1_triangle_inequality(triple):
    p, q, r = triple
    for diagonals in (False, True):
        d_pr = projected_emd(p, r, diagonals=diagonals, reduction="none")
        d_pq = projected_emd(p, q, diagonals=diagonals, reduction="none")
        d_qr = projected_emd(q, r, diagonals=diagonals, reduction="none")
        assert (d_pr <= d_pq + d_qr + 1e-9).all()
    assert (
        l1(p, r, reduction="none")
        <= l1(p, q, reduction="none") + l1(q, r, reduction="none") + 1e-12
    ).all()


@DISCREPANCY_SETTINGS
@given(histogram_pairs(count=1))
def test_histogram_projections_preserve_mass(single):
    (p,) = single
    for proj in histogram_projections(p, diagonals=True):
        assert (proj >= 0).all()
        torch.testing.assert_close(proj.sum(-1), torch.ones(p.shape[0], dtype=p.dtype))
