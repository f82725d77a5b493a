"""B-spline Gauss-Newton registration (core.registration.bspline) and the default pipeline of register()."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import napari_discreg as nd
from napari_discreg.core.config import BSplineConfig, RefineConfig
from napari_discreg.core.registration import bspline
from napari_discreg.core.registration.metrics import end_point_error
from napari_discreg.core.registration.mind import mind_descriptors, mind_ssc
from napari_discreg.core.registration.preprocess import network_input
from napari_discreg.core.registration.refine import refine_field
from napari_discreg.core.registration.warp import jacobian_determinant


def _t(image):
    return network_input(image, 1)


def _epe(field, pair):
    return end_point_error(np.asarray(field), pair.displacement, pair.mask)


def test_basis_is_a_partition_of_unity_and_fits_a_spline_exactly():
    n = bspline.control_grid_size(50, 8.0)
    b = bspline.bspline_basis(50, 8.0, n)
    torch.testing.assert_close(b.sum(1), torch.ones(50))
    # a coarser level's pixels sit between full-resolution pixels: still a partition of unity
    torch.testing.assert_close(bspline.bspline_basis(25, 8.0, n, 2).sum(1), torch.ones(25))
    by = bspline.bspline_basis(40, 8.0, bspline.control_grid_size(40, 8.0))
    coeff = torch.randn(2, by.shape[1], b.shape[1], generator=torch.Generator().manual_seed(0))
    field = bspline.evaluate_field(coeff, by, b)
    refit = bspline.evaluate_field(bspline.fit_coefficients(field, by, b, ridge=1e-6), by, b)
    torch.testing.assert_close(refit, field, atol=1e-3, rtol=1e-3)


def test_banded_solve_matches_the_dense_solve():
    torch.manual_seed(0)
    ny, nx = 5, 6
    # a positive semi-definite curvature from random per-pixel gradients
    by, bx = bspline.bspline_basis(30, 8.0, ny), bspline.bspline_basis(38, 8.0, nx)
    gr, gc = torch.randn(30, 38), torch.randn(30, 38)
    curv = torch.stack([gr * gr, gr * gc, gc * gc])
    py, px = bspline._pair_products(by).transpose(1, 2), bspline._pair_products(bx)
    hess = torch.einsum("bdix,exj->bdeij", torch.einsum("diy,byx->bdix", py, curv), px)
    g = torch.randn(2, ny, nx)
    banded = bspline._solve(hess, g, 0.1, 1e-3, ny, nx)
    # the dense system written out from its definition
    n = ny * nx
    big = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    b_all = torch.einsum("yi,xj->yxij", by, bx).reshape(30 * 38, n).double()
    a = {(0, 0): gr * gr, (0, 1): gr * gc, (1, 0): gr * gc, (1, 1): gc * gc}
    for (p, q), val in a.items():
        big[p::2, q::2] = b_all.T @ (val.reshape(-1, 1).double() * b_all)
    lap = torch.zeros(n, n, dtype=torch.float64)
    for i in range(ny):
        for j in range(nx):
            for di, dj in ((1, 0), (0, 1)):
                if i + di < ny and j + dj < nx:
                    u, v = i * nx + j, (i + di) * nx + j + dj
                    lap[u, u] += 1
                    lap[v, v] += 1
                    lap[u, v] -= 1
                    lap[v, u] -= 1
    big[0::2, 0::2] += 0.1 * lap
    big[1::2, 1::2] += 0.1 * lap
    big += 1e-3 * torch.eye(2 * n, dtype=torch.float64)
    dense = torch.linalg.solve(big, -g.permute(1, 2, 0).reshape(-1).double())
    torch.testing.assert_close(
        banded, dense.float().view(ny, nx, 2).permute(2, 0, 1), atol=1e-4, rtol=1e-4
    )


def test_membrane_gradient_is_the_laplacian_of_the_energy():
    c = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    energy = 0.5 * (((c[:, 1:] - c[:, :-1]) ** 2).sum() + ((c[:, :, 1:] - c[:, :, :-1]) ** 2).sum())
    energy.backward()
    torch.testing.assert_close(bspline._membrane(c.detach()), c.grad)


def test_bspline_registers_a_t1_t2_pair_better_than_the_adam_refinement(pair):
    f, m = _t(pair.fixed), _t(pair.moving)
    field = bspline.bspline_refine(f, m)[0].numpy()
    identity = _epe(np.zeros_like(pair.displacement), pair)
    adam = _epe(refine_field(f, m, None, RefineConfig())[0].numpy(), pair)
    assert _epe(field, pair) < 0.3 * identity, (_epe(field, pair), identity)
    assert _epe(field, pair) < adam, (_epe(field, pair), adam)
    assert (jacobian_determinant(field) > 0).all()


def test_bspline_from_an_initial_field_and_without_steps(pair):
    f, m = _t(pair.fixed), _t(pair.moving)
    truth = torch.from_numpy(pair.displacement)[None]
    none = BSplineConfig(iterations=(0, 0, 0))
    # no steps: the B-spline fit of the start, which for a smooth field is the field
    fit = bspline.bspline_refine(f, m, truth, none)
    assert _epe(fit[0].numpy(), pair) < 0.1
    np.testing.assert_array_equal(bspline.bspline_refine(f, m, None, none).numpy(), 0)
    # starting at the truth, the optimisation stays near it
    assert _epe(bspline.bspline_refine(f, m, truth)[0].numpy(), pair) < 0.5


def test_bspline_handles_odd_sizes_batches_and_blank_images(pair):
    f, m = _t(pair.fixed[:-3, :-5]), _t(pair.moving[:-3, :-5])
    out = bspline.bspline_refine(torch.cat([f, f]), torch.cat([m, f]))
    assert (
        out.shape == (2, 2, pair.fixed.shape[0] - 3, pair.fixed.shape[0] - 5)
        and torch.isfinite(out).all()
    )
    assert out[1].abs().max() < 0.05  # an image onto itself
    blank = torch.zeros_like(f)
    assert torch.isfinite(bspline.bspline_refine(blank, blank)).all()
    with pytest.raises(ValueError, match="one shape"):
        bspline.bspline_refine(f, f[..., :-1])
    with pytest.raises(ValueError, match="initial field"):
        bspline.bspline_refine(f, f, torch.zeros(1, 2, 4, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spacing": 1}, "spacing"),
        ({"spacing": float("inf")}, "spacing"),
        ({"iterations": ()}, "empty"),
        ({"iterations": (2, -1)}, "whole numbers"),
        ({"smoothness": -1}, "smoothness"),
        ({"dilations": ()}, "dilations"),
    ],
)
def test_bspline_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BSplineConfig(**kwargs)


def test_mind_descriptors_stack_the_blocks_of_mind_ssc():
    img = torch.rand(1, 1, 30, 34, generator=torch.Generator().manual_seed(1))
    both = mind_descriptors(img, 1, (2, 1))
    torch.testing.assert_close(both[:, :6], mind_ssc(img, 1, 2))
    torch.testing.assert_close(both[:, 6:], mind_ssc(img, 1, 1))


# ------------------------------------------------------------------ register() methods


def test_register_default_is_the_network_pipeline_and_bspline_runs_its_steps(pair, shipped_model):
    default = nd.register(pair.fixed, pair.moving, model=shipped_model)
    assert default.method == nd.DEFAULT_METHOD == "network" and default.prealign == "affine"
    assert default.refine_steps == 0
    spline = nd.register(pair.fixed, pair.moving, model=shipped_model, method="bspline")
    assert spline.refine_steps == sum(nd.BSplineConfig().iterations)
    identity = _epe(np.zeros_like(default.displacement), pair)
    assert _epe(default.displacement, pair) < 0.5 * identity
    assert _epe(spline.displacement, pair) < 0.5 * identity
    # the network's histograms are the same whatever made the field (computed on first use
    # for "bspline"; a 96 px pair has no coarse passes)
    np.testing.assert_array_equal(default.probabilities, spline.probabilities)
    np.testing.assert_array_equal(default.discrepancy, spline.discrepancy)
    np.testing.assert_array_equal(default.labels, spline.labels)
    # the guard reused the B-spline's descriptors: same answer as computing them afresh
    assert not spline.identity_fallback


@pytest.mark.parametrize("method", list(nd.METHODS))
def test_every_method_runs_and_keeps_the_callers_model_mode(pair, tiny_model, method):
    tiny_model.train()
    res = nd.register(pair.fixed, pair.moving, model=tiny_model, method=method)
    assert tiny_model.training
    tiny_model.eval()
    assert res.method == method and res.displacement.shape == (
        2,
        pair.fixed.shape[0],
        pair.fixed.shape[0],
    )
    assert np.isfinite(res.displacement).all() and res.probabilities.shape[0] == 2
    if method == "none":  # the pre-alignment alone: an affine map
        grid = np.mgrid[: pair.fixed.shape[0], : pair.fixed.shape[1]].astype(np.float64)
        expected = np.einsum("ij,jhw->ihw", res.affine[:2, :2], grid)
        expected += res.affine[:2, 2, None, None] - grid
        np.testing.assert_allclose(res.displacement, expected, atol=1e-3)


def test_register_method_and_refine_forms(pair, tiny_model):
    reg = lambda **kw: nd.register(pair.fixed, pair.moving, model=tiny_model, **kw)  # noqa: E731
    assert reg(refine=False).method == "network"
    assert reg(refine=0).method == "network"
    assert reg(refine=3).method == "network+adam" and reg(refine=3).refine_steps == 3
    quick = nd.BSplineConfig(iterations=(1, 1, 1))
    assert reg(refine=quick).method == "bspline" and reg(refine=quick).refine_steps == 3
    with pytest.raises(ValueError, match="unknown method"):
        reg(method="elastix")
    with pytest.raises(ValueError, match="BSplineConfig"):
        reg(method="bspline", refine=RefineConfig())
    with pytest.raises(ValueError, match="no refinement"):
        reg(method="network", refine=quick)


def test_register_runs_from_two_threads_with_one_model(pair, shipped_model):
    ref = nd.register(pair.fixed, pair.moving, model=shipped_model, method="network")
    out, errors = [], []

    def work():
        try:
            r = nd.register(pair.fixed, pair.moving, model=shipped_model)
            out.append((r.displacement, r.probabilities))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 2
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], ref.probabilities)
