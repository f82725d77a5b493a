"""core.registration.histograms.point_summary: the numbers the histogram inspector draws for one point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_discreg.core.learning.discrepancy import emd_1d, l1, projected_emd, sliced_wasserstein
from napari_discreg.core.registration.histograms import HISTOGRAM_KEYS, point_summary
from napari_discreg.core.registration.label_grid import expected_displacement, label_offsets


def _example(k=5):
    rng = np.random.default_rng(3)
    p = rng.random((2, k, k)).astype(np.float32)
    p /= p.sum(axis=(1, 2), keepdims=True)
    return p, label_offsets(k, 2.0).numpy()


def test_point_summary_matches_the_discrepancy_functions():
    p, offsets = _example()
    s = point_summary(p, offsets)
    assert set(HISTOGRAM_KEYS) <= set(s)
    np.testing.assert_array_equal(s["f1"], p[0])
    np.testing.assert_array_equal(s["f2"], p[1])
    np.testing.assert_allclose(s["rows_f1"], p[0].sum(1), rtol=1e-6)
    np.testing.assert_allclose(s["cols_f2"], p[1].sum(0), rtol=1e-6)
    np.testing.assert_allclose(s["cdf_cols_f1"], np.cumsum(p[0].sum(0)), rtol=1e-6)
    np.testing.assert_allclose(s["cdf_rows_f2"][-1], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(s["offsets"], offsets)
    t1, t2 = torch.from_numpy(p[0])[None], torch.from_numpy(p[1])[None]
    assert s["pemd"] == pytest.approx(float(projected_emd(t1, t2)), rel=1e-6)
    assert s["l1"] == pytest.approx(float(l1(t1, t2)), rel=1e-6)
    assert s["swd"] == pytest.approx(float(sliced_wasserstein(t1, t2)), rel=1e-6)
    rows = emd_1d(torch.from_numpy(p[0].sum(1)), torch.from_numpy(p[1].sum(1)))
    assert s["emd_rows"] == pytest.approx(float(rows), rel=1e-5)
    # pEMD of the marginals is the mean of the two 1D EMDs drawn as areas
    assert s["pemd"] == pytest.approx(0.5 * (s["emd_rows"] + s["emd_cols"]), rel=1e-5)
    # the area between the cumulative sums is the 1D EMD
    area = np.abs(s["cdf_cols_f1"] - s["cdf_cols_f2"]).sum()
    assert s["emd_cols"] == pytest.approx(float(area), rel=1e-5)


def test_expected_displacements():
    p, offsets = _example()
    s = point_summary(p, offsets)
    for key, hist in (("expected_f1", p[0]), ("expected_f2", p[1]), ("expected", p.mean(0))):
        want = (float((hist.sum(1) * offsets).sum()), float((hist.sum(0) * offsets).sum()))
        np.testing.assert_allclose(s[key], want, rtol=1e-5, atol=1e-6)
    prob = torch.from_numpy(p[0])[None, None, None]
    via_labels = expected_displacement(prob, torch.from_numpy(offsets))[0, :, 0, 0]
    np.testing.assert_allclose(s["expected_f1"], via_labels.numpy(), rtol=1e-6)
    # a one-hot head reads out its bin exactly
    one_hot = np.zeros_like(p)
    one_hot[:, 1, 3] = 1.0
    s = point_summary(one_hot, offsets)
    assert s["expected"] == pytest.approx((offsets[1], offsets[3]))
    assert s["pemd"] == 0.0 and s["l1"] == 0.0


def test_point_summary_checks_shapes():
    p, offsets = _example()
    with pytest.raises(ValueError, match=r"\(2, K, K\)"):
        point_summary(p[0], offsets)
    with pytest.raises(ValueError, match="offsets"):
        point_summary(p, offsets[:-1])
