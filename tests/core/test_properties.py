"""Property-based tests (hypothesis) of the core numerics."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_discreg.core.learning.discrepancy import (
    emd_1d,
    histogram_projections,
    l1,
    projected_emd,
    sliced_wasserstein,
)
from napari_discreg.core.registration.label_grid import (
    label_offsets,
    label_to_displacement,
    quantise,
    soft_labels,
)
from napari_discreg.core.registration.warp import warp

# =======================================================================================
# Discrepancies (napari_discreg.core.learning.discrepancy)
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


# === Warping and quantisation (napari_discreg.core.registration.warp, napari_discreg.core.registration.label_grid) ===

WARP_SETTINGS = settings(max_examples=40, deadline=None)


@WARP_SETTINGS
@given(
    st.integers(4, 24),
    st.integers(4, 24),
    st.integers(0, 2**31 - 1),
)
def test_zero_field_is_identity(h, w, seed):
    img = torch.from_numpy(np.random.default_rng(seed).random((1, 1, h, w)))
    out = warp(img, torch.zeros(1, 2, h, w, dtype=img.dtype))
    torch.testing.assert_close(out, img, atol=1e-12, rtol=0)


@WARP_SETTINGS
@given(
    st.integers(-3, 3),
    st.integers(-3, 3),
    st.integers(-3, 3),
    st.integers(-3, 3),
    st.integers(0, 2**31 - 1),
)
def test_composition_of_integer_shifts(a0, a1, b0, b1, seed):
    # warping by shift a, then by shift b equals one warp by a + b in the interior
    img = torch.from_numpy(np.random.default_rng(seed).random((1, 1, 24, 24)))

    def shift(r, c):
        f = torch.zeros(1, 2, 24, 24, dtype=img.dtype)
        f[:, 0], f[:, 1] = float(r), float(c)
        return f

    twice = warp(warp(img, shift(a0, a1)), shift(b0, b1))
    once = warp(img, shift(a0 + b0, a1 + b1))
    torch.testing.assert_close(twice[..., 7:-7, 7:-7], once[..., 7:-7, 7:-7], atol=1e-12, rtol=0)


@WARP_SETTINGS
@given(
    st.sampled_from([3, 5, 7, 11, 15]),
    st.floats(0.5, 10.0),
    st.integers(0, 2**31 - 1),
)
def test_quantisation_round_trip(k, q, seed):
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(rng.integers(0, k * k, size=(1, 3, 4)))
    field = label_to_displacement(labels, k, q)
    assert torch.equal(quantise(field, k, q), labels)
    # a field off a bin centre by less than half a bin still quantises to that bin
    step = 2 * q / (k - 1)
    jitter = torch.from_numpy(rng.uniform(-0.49, 0.49, size=field.shape).astype(np.float32)) * step
    assert torch.equal(quantise(field + jitter, k, q), labels)
    # soft labels put their expectation exactly on the field
    soft = soft_labels(field + jitter, k, q)
    offsets = label_offsets(k, q)
    expect = torch.stack(
        [(soft.sum(-1) * offsets).sum(-1), (soft.sum(-2) * offsets).sum(-1)], dim=1
    )
    torch.testing.assert_close(expect, (field + jitter).clamp(-q, q), atol=1e-4, rtol=1e-4)
