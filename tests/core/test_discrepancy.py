"""Semantics of the head discrepancies (METHOD.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from napari_discreg.core.learning.discrepancy import (
    Discrepancy,
    angle_projections,
    discrepancy_fn,
    emd_1d,
    histogram_projections,
    l1,
    projected_emd,
    projected_emd_angles,
    projected_emd_swd,
    random_directions,
    sliced_wasserstein,
)

DTYPES = [torch.float32, torch.float64]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]

# every discrepancy with its default settings, plus the diagonal pEMD variant
FUNCTIONS = {
    "l1": l1,
    "swd": sliced_wasserstein,
    "pemd": projected_emd,
    "pemd_diag": lambda p, q, **kw: projected_emd(p, q, diagonals=True, **kw),
    "pemd16": projected_emd_angles,
    "pemd16+": projected_emd_swd,
}
# those with a per-control-point value
PER_POINT = {k: v for k, v in FUNCTIONS.items() if k not in ("swd", "pemd16+")}


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def random_histograms(shape, k, *, seed=0, dtype=torch.float64, device="cpu", temperature=1.0):
    """Normalised random histograms of shape (*shape, k, k) (softmax of Gaussian logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, k * k, generator=g, dtype=torch.float64) / temperature
    return logits.softmax(-1).reshape(*shape, k, k).to(device=device, dtype=dtype)


def one_hot(k, row, col, *, n=1, dtype=torch.float64, device="cpu"):
    p = torch.zeros(n, k, k, dtype=dtype, device=device)
    p[:, row, col] = 1.0
    return p


def tol(dtype):
    return (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    )


# ---------------------------------------------------------------------------------------
# basic metric properties
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_zero_for_identical_inputs(name, dtype, device):
    p = random_histograms((2, 3, 4), 5, dtype=dtype, device=device)
    value = FUNCTIONS[name](p, p.clone())
    assert value.shape == ()
    assert value.dtype == dtype and value.device.type == device.type
    assert value.item() == 0.0


@pytest.mark.parametrize("name", list(PER_POINT))
def test_zero_per_point_for_identical_inputs(name, dtype, device):
    p = random_histograms((6,), 5, dtype=dtype, device=device)
    values = PER_POINT[name](p, p.clone(), reduction="none")
    assert values.shape == (6,)
    assert torch.all(values == 0)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_symmetric_and_positive_for_different_inputs(name, dtype, device):
    p = random_histograms((10,), 5, seed=1, dtype=dtype, device=device)
    q = random_histograms((10,), 5, seed=2, dtype=dtype, device=device)
    d_pq, d_qp = FUNCTIONS[name](p, q), FUNCTIONS[name](q, p)
    torch.testing.assert_close(d_pq, d_qp, **tol(dtype))
    assert d_pq.item() > 0


@pytest.mark.parametrize("name", list(PER_POINT))
def test_per_point_values_are_symmetric(name, dtype, device):
    p = random_histograms((2, 3), 6, seed=3, dtype=dtype, device=device)
    q = random_histograms((2, 3), 6, seed=4, dtype=dtype, device=device)
    fn = PER_POINT[name]
    torch.testing.assert_close(fn(p, q, reduction="none"), fn(q, p, reduction="none"), **tol(dtype))


# ---------------------------------------------------------------------------------------
# pEMD respects the label geometry, L1 does not
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_pemd_grows_with_shift_while_l1_is_constant(axis, dtype, device):
    k = 11
    start = (5, 2)

    def shifted(s):
        r, c = (start[0] + s, start[1]) if axis == "rows" else (start[0], start[1] + s)
        return one_hot(k, r, c, n=3, dtype=dtype, device=device)

    p = shifted(0)
    near, far = shifted(1), shifted(5)
    pemd_near, pemd_far = projected_emd(p, near), projected_emd(p, far)
    # one marginal moves by s bins, the other not at all: (0 + s) / 2
    torch.testing.assert_close(pemd_near, torch.tensor(0.5, dtype=dtype, device=device))
    torch.testing.assert_close(pemd_far, torch.tensor(2.5, dtype=dtype, device=device))
    torch.testing.assert_close(pemd_far / pemd_near, torch.tensor(5.0, dtype=dtype, device=device))
    # L1 sees two differing bins in both cases
    l1_near, l1_far = l1(p, near), l1(p, far)
    torch.testing.assert_close(l1_near, l1_far)
    torch.testing.assert_close(l1_near, torch.tensor(2.0 / k**2, dtype=dtype, device=device))


def test_pemd_is_linear_in_the_shift():
    k = 9
    p = one_hot(k, 0, 4)
    values = torch.stack([projected_emd(p, one_hot(k, s, 4)) for s in range(k)])
    torch.testing.assert_close(values, torch.arange(k, dtype=torch.float64) / 2)


def test_pemd_bound_is_reached_by_opposite_corners():
    k = 7
    p, q = one_hot(k, 0, 0), one_hot(k, k - 1, k - 1)
    assert projected_emd(p, q).item() == pytest.approx(k - 1)
    # diagonal projection i - j does not move, anti-diagonal i + j moves 2K - 2 bins
    assert projected_emd(p, q, diagonals=True).item() == pytest.approx(
        (2 * (k - 1) + 2 * (k - 1)) / 4
    )


def test_pemd_marginals_match_scipy_wasserstein(dtype, device):
    k, n = 7, 25
    p = random_histograms((n,), k, seed=5, dtype=dtype, device=device, temperature=0.7)
    q = random_histograms((n,), k, seed=6, dtype=dtype, device=device, temperature=0.7)
    ours = projected_emd(p, q, reduction="none").cpu().double().numpy()

    bins = np.arange(k, dtype=float)
    p_np, q_np = p.cpu().double().numpy(), q.cpu().double().numpy()
    expected = np.empty(n)
    for i in range(n):
        w_rows = wasserstein_distance(bins, bins, p_np[i].sum(1), q_np[i].sum(1))
        w_cols = wasserstein_distance(bins, bins, p_np[i].sum(0), q_np[i].sum(0))
        expected[i] = 0.5 * (w_rows + w_cols)
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(ours, expected, atol=atol, rtol=0)
    assert projected_emd(p, q).item() == pytest.approx(expected.mean(), abs=atol)


def test_emd_1d_matches_scipy_on_diagonal_projections():
    k, n = 5, 10
    p = random_histograms((n,), k, seed=7)
    q = random_histograms((n,), k, seed=8)
    bins = np.arange(2 * k - 1, dtype=float)
    for a, b in zip(
        histogram_projections(p, diagonals=True)[2:],
        histogram_projections(q, diagonals=True)[2:],
        strict=True,
    ):
        expected = [wasserstein_distance(bins, bins, a[i].numpy(), b[i].numpy()) for i in range(n)]
        np.testing.assert_allclose(emd_1d(a, b).numpy(), expected, atol=1e-10)


# ---------------------------------------------------------------------------------------
# diagonal projections
# ---------------------------------------------------------------------------------------


def test_histogram_projections_of_a_one_hot():
    k, i, j = 5, 1, 3
    rows, cols, diag, anti = histogram_projections(one_hot(k, i, j)[0], diagonals=True)
    assert rows.shape == cols.shape == (k,)
    assert diag.shape == anti.shape == (2 * k - 1,)
    assert rows.argmax().item() == i and cols.argmax().item() == j
    assert diag.argmax().item() == i - j + k - 1
    assert anti.argmax().item() == i + j
    for proj in (rows, cols, diag, anti):
        assert proj.sum().item() == pytest.approx(1.0)
        assert proj.max().item() == pytest.approx(1.0)


def test_histogram_projections_preserve_mass():
    p = random_histograms((3, 4), 6, seed=9)
    for proj in histogram_projections(p, diagonals=True):
        torch.testing.assert_close(proj.sum(-1), torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("s", [1, 2, 4])
def test_pemd_diagonals_on_a_diagonal_shift(s, dtype, device):
    """A shift by (s, s) moves both marginals and the anti-diagonal (i + j) projection,
    by s, s and 2s bins, and leaves the diagonal (i - j) projection in place; so the
    4-projection mean is (s + s + 0 + 2s) / 4 = s, the same as the marginal-only value
    (s + s) / 2, and linear in s. A shift by (s, -s) swaps the roles of the two diagonals.
    A pure column shift by s moves the column marginal and both diagonals by s:
    3s / 4 with diagonals versus s / 2 without."""
    k = 9
    p = one_hot(k, 2, 4, dtype=dtype, device=device)
    diag_shift = one_hot(k, 2 + s, 4 + s, dtype=dtype, device=device)
    anti_shift = one_hot(k, 2 + s, 4 - s, dtype=dtype, device=device)
    col_shift = one_hot(k, 2, 4 + s, dtype=dtype, device=device)

    def value(x):
        return torch.tensor(x, dtype=dtype, device=device)

    for q in (diag_shift, anti_shift):
        torch.testing.assert_close(projected_emd(p, q, diagonals=True), value(s))
        torch.testing.assert_close(projected_emd(p, q, diagonals=False), value(s))
    torch.testing.assert_close(projected_emd(p, col_shift, diagonals=True), value(0.75 * s))
    torch.testing.assert_close(projected_emd(p, col_shift, diagonals=False), value(0.5 * s))

    terms = [
        emd_1d(a, b)
        for a, b in zip(
            *(histogram_projections(x, diagonals=True) for x in (p, diag_shift)), strict=True
        )
    ]
    torch.testing.assert_close(torch.cat(terms), value([s, s, 0.0, 2.0 * s]))


def test_pemd_diagonals_see_correlation_that_marginals_miss():
    """Mass on the main diagonal {(0,0), (1,1)} versus the anti-diagonal {(0,1), (1,0)}:
    identical marginals (marginal pEMD = 0), but the diagonal projections differ by one
    bin of W1 each: (0 + 0 + 1 + 1) / 4 = 0.5."""
    k = 4
    p = torch.zeros(1, k, k, dtype=torch.float64)
    q = torch.zeros_like(p)
    p[0, 0, 0] = p[0, 1, 1] = 0.5
    q[0, 0, 1] = q[0, 1, 0] = 0.5
    assert projected_emd(p, q).item() == 0.0
    assert projected_emd(p, q, diagonals=True).item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------
# shapes, leading dimensions, reductions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PER_POINT))
def test_any_leading_dims_and_reductions(name):
    fn = PER_POINT[name]
    p = random_histograms((2, 3, 4), 5, seed=10)
    q = random_histograms((2, 3, 4), 5, seed=11)
    per_point = fn(p, q, reduction="none")
    assert per_point.shape == (2, 3, 4)
    flat = fn(p.reshape(-1, 5, 5), q.reshape(-1, 5, 5), reduction="none")
    torch.testing.assert_close(per_point.reshape(-1), flat)
    torch.testing.assert_close(fn(p, q), per_point.mean())
    torch.testing.assert_close(fn(p, q, reduction="sum"), per_point.sum())
    single = fn(p[0, 0, 0], q[0, 0, 0], reduction="none")
    assert single.shape == ()
    torch.testing.assert_close(single, per_point[0, 0, 0])


def test_swd_flattens_leading_dims():
    p = random_histograms((2, 3, 4), 5, seed=12)
    q = random_histograms((2, 3, 4), 5, seed=13)
    torch.testing.assert_close(
        sliced_wasserstein(p, q), sliced_wasserstein(p.reshape(-1, 5, 5), q.reshape(-1, 5, 5))
    )


def test_l1_per_point_is_mean_over_bins():
    p = random_histograms((8,), 4, seed=14)
    q = random_histograms((8,), 4, seed=15)
    expected = (p - q).abs().sum((-1, -2)) / 16
    torch.testing.assert_close(l1(p, q, reduction="none"), expected)


def test_swd_matches_a_direct_computation():
    k, n, m = 4, 12, 32
    p = random_histograms((n,), k, seed=16)
    q = random_histograms((n,), k, seed=17)
    theta = random_directions(k * k, m, seed=5, dtype=torch.float64)
    torch.testing.assert_close(theta.norm(dim=0), torch.ones(m, dtype=torch.float64))
    a = np.sort(p.reshape(n, -1).numpy() @ theta.numpy(), axis=0)
    b = np.sort(q.reshape(n, -1).numpy() @ theta.numpy(), axis=0)
    expected = np.mean((a - b) ** 2)
    assert sliced_wasserstein(p, q, num_projections=m, seed=5).item() == pytest.approx(expected)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize(
    ("shape1", "shape2"),
    [
        ((5,), (5,)),  # too few dims
        ((3, 4, 5), (3, 4, 5)),  # not square
        ((3, 5, 5), (4, 5, 5)),  # different shapes
        ((3, 5, 5), (3, 6, 6)),  # different K
    ],
)
def test_bad_shapes_raise(name, shape1, shape2):
    with pytest.raises(ValueError, match="shape"):
        FUNCTIONS[name](torch.rand(shape1), torch.rand(shape2))


def test_bad_arguments_raise():
    p = random_histograms((3,), 5)
    with pytest.raises(ValueError, match="reduction"):
        l1(p, p, reduction="max")
    with pytest.raises(ValueError, match="reduction"):
        projected_emd(p, p, reduction="median")
    with pytest.raises(ValueError, match="reduction='mean'"):
        sliced_wasserstein(p, p, reduction="none")
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein(p, p, num_projections=0)
    with pytest.raises(ValueError, match="either generator or seed"):
        sliced_wasserstein(p, p, seed=1, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="reduction"):
        projected_emd(p, p, reduction="bogus")
    with pytest.raises(TypeError, match="floating"):
        l1(torch.ones(3, 5, 5, dtype=torch.int64), torch.ones(3, 5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        projected_emd(np.ones((3, 5, 5)), p)


# ---------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------

GRAD_FUNCTIONS = {
    "l1": l1,
    "swd": lambda p, q: sliced_wasserstein(p, q, num_projections=16, seed=3),
    "pemd": projected_emd,
    "pemd_diag": lambda p, q: projected_emd(p, q, diagonals=True),
    "pemd_none": lambda p, q: projected_emd(p, q, reduction="none"),
    "pemd16": projected_emd_angles,
    "pemd16_none": lambda p, q: projected_emd_angles(p, q, reduction="none"),
    "pemd16_90": lambda p, q: projected_emd_angles(p, q, angles=5, max_angle=90),
    "pemd16+": lambda p, q: projected_emd_swd(p, q, num_projections=16, seed=3),
}


@pytest.mark.parametrize("name", list(GRAD_FUNCTIONS))
def test_gradcheck(name):
    # un-normalised positive inputs keep every |.| and every sort away from its kink
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.rand(3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GRAD_FUNCTIONS[name], (p, q), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_gradients_flow_through_softmax(name, dtype, device):
    g = torch.Generator().manual_seed(1)
    logits1 = torch.randn(2, 3, 3, 25, generator=g).to(device=device, dtype=dtype).requires_grad_()
    logits2 = torch.randn(2, 3, 3, 25, generator=g).to(device=device, dtype=dtype).requires_grad_()
    p = logits1.softmax(-1).unflatten(-1, (5, 5))
    q = logits2.softmax(-1).unflatten(-1, (5, 5))
    FUNCTIONS[name](p, q).backward()
    for logits in (logits1, logits2):
        assert logits.grad is not None and logits.grad.dtype == dtype
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# sliced Wasserstein randomness
# ---------------------------------------------------------------------------------------


def test_swd_deterministic_for_fixed_seed():
    p = random_histograms((20,), 5, seed=18)
    q = random_histograms((20,), 5, seed=19)
    a = sliced_wasserstein(p, q, num_projections=32, seed=7)
    b = sliced_wasserstein(p, q, num_projections=32, seed=7)
    assert a.item() == b.item()
    assert sliced_wasserstein(p, q).item() == sliced_wasserstein(p, q, seed=0).item()
    c = sliced_wasserstein(p, q, num_projections=32, seed=8)
    assert c.item() != a.item()


def test_swd_generator():
    p = random_histograms((20,), 5, seed=20)
    q = random_histograms((20,), 5, seed=21)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    first = sliced_wasserstein(p, q, num_projections=16, generator=g1)
    assert first.item() == sliced_wasserstein(p, q, num_projections=16, generator=g2).item()
    assert first.item() == sliced_wasserstein(p, q, num_projections=16, seed=4).item()
    # the generator is advanced: the next call uses new directions
    assert sliced_wasserstein(p, q, num_projections=16, generator=g1).item() != first.item()


def test_swd_same_directions_for_every_dtype(device):
    p = random_histograms((15,), 5, seed=22, device=device)
    q = random_histograms((15,), 5, seed=23, device=device)
    d64 = sliced_wasserstein(p, q, seed=2)
    d32 = sliced_wasserstein(p.float(), q.float(), seed=2)
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), d64, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# names and factory
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "member"),
    [
        ("l1", Discrepancy.L1),
        ("L1", Discrepancy.L1),
        ("swd", Discrepancy.SWD),
        ("SWD", Discrepancy.SWD),
        ("sliced_wasserstein", Discrepancy.SWD),
        ("Sliced-Wasserstein", Discrepancy.SWD),
        ("pemd", Discrepancy.PEMD),
        ("pEMD", Discrepancy.PEMD),
        ("projected_emd", Discrepancy.PEMD),
        (" pemd ", Discrepancy.PEMD),
        (Discrepancy.PEMD, Discrepancy.PEMD),
        ("pemd16", Discrepancy.PEMD16),
        ("PEMD16", Discrepancy.PEMD16),
        ("pemd16+", Discrepancy.PEMD16_SWD),
        ("p-EMD (16+)", Discrepancy.PEMD16_SWD),
        (Discrepancy.PEMD16_SWD, Discrepancy.PEMD16_SWD),
    ],
)
def test_parse(name, member):
    assert Discrepancy.parse(name) is member


@pytest.mark.parametrize(
    "bad", ["l2", "wasserstein", "", None, 3, "pemd8", "pemd16++", "mcd", "emd", "pemd_16"]
)
def test_parse_rejects_unknown(bad):
    with pytest.raises(ValueError, match="valid names are .*'pemd'"):
        Discrepancy.parse(bad)


def test_enum_is_a_string():
    assert Discrepancy.PEMD == "pemd"
    assert str(Discrepancy.SWD) == "swd"
    assert Discrepancy("l1") is Discrepancy.L1
    assert Discrepancy.PEMD16 == "pemd16" and Discrepancy.PEMD16_SWD == "pemd16+"
    assert Discrepancy("pemd16+") is Discrepancy.PEMD16_SWD


def test_discrepancy_fn_binds_kwargs():
    p = random_histograms((6,), 5, seed=26)
    q = random_histograms((6,), 5, seed=27)
    d = discrepancy_fn("pemd", diagonals=True, reduction="none")
    torch.testing.assert_close(d(p, q), projected_emd(p, q, diagonals=True, reduction="none"))
    d = discrepancy_fn(Discrepancy.SWD, num_projections=8, seed=1)
    assert d(p, q).item() == sliced_wasserstein(p, q, num_projections=8, seed=1).item()
    torch.testing.assert_close(discrepancy_fn("L1")(p, q), l1(p, q))
    with pytest.raises(TypeError):
        discrepancy_fn("l1", diagonals=True)
    with pytest.raises(ValueError, match="unknown discrepancy"):
        discrepancy_fn("kl")


# ---------------------------------------------------------------------------------------
# p-EMD on 16 directions, and p-EMD (16+) = p-EMD (16) + SWD
# ---------------------------------------------------------------------------------------


def numpy_splat(p, angle_deg):
    """Independent reference: linear splatting of a (K, K) histogram onto unit bins."""
    k = p.shape[-1]
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    th = np.deg2rad(angle_deg)
    t = (i * np.cos(th) + j * np.sin(th)).ravel()
    u = t - t.min()
    lo = np.floor(u + 1e-9).astype(int)
    frac = np.clip(u - lo, 0.0, None)
    hist = np.zeros(lo.max() + 2)
    np.add.at(hist, lo, p.ravel() * (1 - frac))
    np.add.at(hist, lo + 1, p.ravel() * frac)
    return hist


def test_angle_projections_axes_and_diagonals():
    k = 6
    p = random_histograms((4,), k, seed=30)
    proj = angle_projections(p, angles=4)  # 0, 45, 90, 135 degrees
    rows, cols, diag, anti = histogram_projections(p, diagonals=True)
    torch.testing.assert_close(proj[0], rows)
    torch.testing.assert_close(proj[2], cols)
    for pr in proj:
        torch.testing.assert_close(pr.sum(-1), torch.ones(4, dtype=torch.float64))
    # 45 degrees: t = (i + j) / sqrt(2), the anti-diagonal bins i + j at spacing 1 / sqrt(2)
    mean_t = (proj[1] * torch.arange(proj[1].shape[-1])).sum(-1)
    torch.testing.assert_close(mean_t, (anti * torch.arange(2 * k - 1)).sum(-1) / 2**0.5)
    # 135 degrees: t = (j - i) / sqrt(2) + (K - 1) / sqrt(2), mirrored diagonal i - j
    mean_t = (proj[3] * torch.arange(proj[3].shape[-1])).sum(-1)
    expected = (diag.flip(-1) * torch.arange(2 * k - 1)).sum(-1) / 2**0.5
    torch.testing.assert_close(mean_t, expected)


def test_angle_projections_match_numpy_splatting():
    k = 5
    p = random_histograms((3,), k, seed=31)
    for angles, max_angle in ((16, 180.0), (7, 90.0)):
        proj = angle_projections(p, angles=angles, max_angle=max_angle)
        for a, pr in enumerate(proj):
            for n in range(3):
                ref = numpy_splat(p[n].numpy(), a * max_angle / angles)
                ref = ref[: pr.shape[-1]] if ref[pr.shape[-1] :].sum() == 0 else ref
                np.testing.assert_allclose(pr[n].numpy(), ref, atol=1e-12)


def test_pemd16_axis_angles_equal_the_marginal_emd(dtype, device):
    p = random_histograms((8,), 7, seed=32, dtype=dtype, device=device)
    q = random_histograms((8,), 7, seed=33, dtype=dtype, device=device)
    # angles=2 spreads over [0, 180): 0 and 90 degrees, the two marginals
    torch.testing.assert_close(
        projected_emd_angles(p, q, angles=2, reduction="none"),
        projected_emd(p, q, reduction="none"),
        **tol(dtype),
    )
    rows_p, cols_p = histogram_projections(p)
    rows_q, cols_q = histogram_projections(q)
    torch.testing.assert_close(
        projected_emd_angles(p, q, angles=1, reduction="none"), emd_1d(rows_p, rows_q), **tol(dtype)
    )
    torch.testing.assert_close(
        projected_emd_angles(p, q, angles=2, max_angle=180, reduction="none")
        - 0.5 * emd_1d(rows_p, rows_q),
        0.5 * emd_1d(cols_p, cols_q),
        **tol(dtype),
    )


def test_pemd16_per_angle_terms_are_emd_1d_of_the_projections():
    p = random_histograms((5,), 6, seed=34)
    q = random_histograms((5,), 6, seed=35)
    terms = torch.stack(
        [emd_1d(a, b) for a, b in zip(angle_projections(p), angle_projections(q), strict=True)]
    )
    torch.testing.assert_close(projected_emd_angles(p, q, reduction="none"), terms.mean(0))


@pytest.mark.parametrize("direction", [(1, 0), (0, 1), (1, 1), (1, -1)])
def test_pemd16_grows_linearly_with_the_shift(direction, dtype, device):
    """One-hot heads 1 and 5 bins apart: every direction's projection moves 5 times as far
    (one-hot splats are exact), so the value grows 1:5, for every shift direction."""
    k = 13
    r, c = 4, 6
    dr, dc = direction
    p = one_hot(k, r, c, n=2, dtype=dtype, device=device)
    near = one_hot(k, r + dr, c + dc, n=2, dtype=dtype, device=device)
    far = one_hot(k, r + 5 * dr, c + 5 * dc, n=2, dtype=dtype, device=device)
    for fn in (projected_emd_angles, lambda a, b: projected_emd_angles(a, b, max_angle=90)):
        v_near, v_far = fn(p, near), fn(p, far)
        assert v_near.item() > 0
        torch.testing.assert_close(v_far / v_near, torch.tensor(5.0, dtype=dtype, device=device))
    # the exact value: mean over the directions of |dr cos(theta) + dc sin(theta)|
    theta = np.deg2rad(np.arange(16) * 180 / 16)
    expected = np.mean(np.abs(dr * np.cos(theta) + dc * np.sin(theta)))
    assert projected_emd_angles(p, near).item() == pytest.approx(expected, abs=1e-5)


def test_pemd16_sees_every_shift_direction_equally():
    """Over [0, 180) the 16 directions are symmetric: a shift by (s, s) and by (s, -s)
    cost the same; the literal 0-90 reading is blind-ish to (s, -s)."""
    k = 11
    p = one_hot(k, 5, 5)
    diag, anti = one_hot(k, 7, 7), one_hot(k, 7, 3)
    assert projected_emd_angles(p, diag).item() == pytest.approx(
        projected_emd_angles(p, anti).item()
    )
    assert (
        projected_emd_angles(p, anti, max_angle=90).item()
        < projected_emd_angles(p, diag, max_angle=90).item()
    )


def test_pemd16_matches_scipy_wasserstein_at_a_random_angle():
    """Against scipy with the bins as weights at the projected coordinates t: exact for
    one-hot heads and for peaked heads; for diffuse heads the linear splatting is a lower
    bound of W1 at t (it averages the CDF over each unit cell)."""
    k, n = 7, 20
    rng = np.random.default_rng(0)
    angle = float(rng.uniform(5, 90))  # (a second direction, at 2 * angle, is not used)
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    t = (i * np.cos(np.deg2rad(angle)) + j * np.sin(np.deg2rad(angle))).ravel()

    def ours(p, q):  # the second of 2 directions over [0, 2 * angle) is `angle`
        a = angle_projections(p, angles=2, max_angle=2 * angle)[1]
        b = angle_projections(q, angles=2, max_angle=2 * angle)[1]
        return emd_1d(a, b).numpy()

    def scipy_w1(p, q):
        return np.array(
            [
                wasserstein_distance(t, t, p[m].numpy().ravel(), q[m].numpy().ravel())
                for m in range(len(p))
            ]
        )

    # one-hot heads at random bins: exact
    cells = rng.integers(0, k, size=(2, n, 2))
    p = torch.stack([one_hot(k, *cells[0, m])[0] for m in range(n)])
    q = torch.stack([one_hot(k, *cells[1, m])[0] for m in range(n)])
    np.testing.assert_allclose(ours(p, q), scipy_w1(p, q), atol=1e-10)

    # random histograms: the same W1 as scipy on the splatted grid, a lower bound at t
    p = random_histograms((n,), k, seed=36)
    q = random_histograms((n,), k, seed=37)
    a = angle_projections(p, angles=2, max_angle=2 * angle)[1].numpy()
    b = angle_projections(q, angles=2, max_angle=2 * angle)[1].numpy()
    grid = np.arange(a.shape[-1], dtype=float)
    on_grid = [wasserstein_distance(grid, grid, a[m], b[m]) for m in range(n)]
    np.testing.assert_allclose(ours(p, q), on_grid, atol=1e-10)
    exact, approx = scipy_w1(p, q), ours(p, q)
    assert np.all(approx <= exact + 1e-10)
    assert np.all(approx >= 0.5 * exact)
    assert approx.mean() == pytest.approx(exact.mean(), rel=0.15)


def test_pemd16_swd_is_the_sum_of_its_terms():
    p = random_histograms((30,), 5, seed=38)
    q = random_histograms((30,), 5, seed=39)
    expected = projected_emd_angles(p, q) + sliced_wasserstein(p, q, num_projections=128, seed=4)
    torch.testing.assert_close(projected_emd_swd(p, q, seed=4), expected)
    assert projected_emd_swd(p, q).item() == projected_emd_swd(p, q, seed=0).item()
    assert projected_emd_swd(p, q, seed=1).item() != projected_emd_swd(p, q, seed=2).item()
    torch.testing.assert_close(projected_emd_swd(p, q, swd_weight=0.0), projected_emd_angles(p, q))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert projected_emd_swd(p, q, generator=g1).item() == projected_emd_swd(p, q, seed=5).item()
    assert (
        projected_emd_swd(p, q, generator=g1).item() != projected_emd_swd(p, q, generator=g2).item()
    )


def test_pemd16_works_under_inference_mode_then_with_gradients():
    p = random_histograms((4,), 9, seed=40, dtype=torch.float32)
    q = random_histograms((4,), 9, seed=41, dtype=torch.float32)
    with torch.inference_mode():  # the cached matrices must not become inference tensors
        projected_emd_angles(p, q, angles=3, max_angle=77.0)
        angle_projections(p, angles=3, max_angle=77.0)
    x = p.clone().requires_grad_()
    projected_emd_angles(x, q, angles=3, max_angle=77.0).backward()
    angle_projections(x, angles=3, max_angle=77.0)[1].sum().backward()
    assert torch.isfinite(x.grad).all()


def test_pemd16_bad_arguments_raise():
    p = random_histograms((3,), 5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="angles"):
            projected_emd_angles(p, p, angles=bad)
    for bad in (0, -10, 181):
        with pytest.raises(ValueError, match="max_angle"):
            projected_emd_angles(p, p, max_angle=bad)
    with pytest.raises(ValueError, match="reduction='mean'"):
        projected_emd_swd(p, p, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        projected_emd_angles(p, p, reduction="max")
    with pytest.raises(ValueError, match="max_angle"):
        projected_emd_swd(p, p, max_angle=200)


def test_pemd16_factory():
    p = random_histograms((2, 3), 5, seed=42)
    q = random_histograms((2, 3), 5, seed=43)
    torch.testing.assert_close(discrepancy_fn("pemd16")(p, q), projected_emd_angles(p, q))
    torch.testing.assert_close(
        discrepancy_fn("pemd16", angles=8, reduction="none")(p, q),
        projected_emd_angles(p, q, angles=8, reduction="none"),
    )
    # the defaults are the paper's: 16 directions plus SWD with 128 projections
    torch.testing.assert_close(
        discrepancy_fn("p-EMD (16+)")(p, q),
        projected_emd_angles(p, q, angles=16) + sliced_wasserstein(p, q, num_projections=128),
    )
    d = discrepancy_fn(Discrepancy.PEMD16_SWD, seed=9)
    assert d(p, q).item() == projected_emd_swd(p, q, seed=9).item()
    with pytest.raises(TypeError):
        discrepancy_fn("pemd16", diagonals=True)


def test_every_member_has_a_display_name_and_a_function():
    from _protocol import ROW_NAMES

    from napari_discreg.core.learning.discrepancy import DISPLAY_NAMES

    assert set(DISPLAY_NAMES) == set(Discrepancy)
    assert set(ROW_NAMES) == {kind.value for kind in Discrepancy}
    p = random_histograms((4,), 5, seed=44)
    for kind in Discrepancy:
        assert discrepancy_fn(kind)(p, p).item() == 0.0
