"""The target registration error of landmarks (pure NumPy) and its report in the widget."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_discreg._widgets._landmarks import (
    format_tre,
    landmark_errors,
    matching_landmarks,
    sample_bilinear,
    tre_summary,
)
from napari_discreg.core.registration.geometry import sample_field


def test_bilinear_sampling_matches_the_warp_convention():
    rng = np.random.default_rng(0)
    field = rng.normal(size=(2, 17, 23))
    # inside, on the borders and outside (the border value, as the warp does)
    pts = np.concatenate(
        [rng.uniform([0, 0], [16, 22], size=(50, 2)), [[0, 0], [16, 22], [-3, 5], [20, 30]]]
    )
    np.testing.assert_allclose(sample_bilinear(field, pts), sample_field(field, pts), atol=1e-12)
    np.testing.assert_allclose(sample_bilinear(field, [[4, 7]]), field[:, 4, 7][None])


def test_tre_before_and_after_a_known_field():
    fixed = np.array([[10.0, 10.0], [20.0, 5.0], [30.0, 40.0]])
    shift = np.array([3.0, -4.0])  # moving = fixed + (3, -4): 5 px apart
    moving = fixed + shift
    exact = np.broadcast_to(shift[:, None, None], (2, 50, 50)).copy()
    errors = landmark_errors(fixed, moving, exact)
    np.testing.assert_allclose(errors["before"], 5.0)
    np.testing.assert_allclose(errors["after"], 0.0, atol=1e-12)
    half = exact / 2  # half-way: 2.5 px left
    summary = tre_summary(fixed, moving, half)
    assert summary["landmarks"] == 3
    assert summary["px"]["before"] == {"median": 5.0, "mean": 5.0}
    assert summary["px"]["after"]["median"] == pytest.approx(2.5)
    assert summary["robustness"] == 1.0
    assert "physical" not in summary  # unit spacing: pixels only
    text = format_tre(summary)
    assert "median 5.00 → 2.50 px" in text and "3 landmarks" in text
    # the field is sampled at the fixed point (bilinear), not at the moving one
    ramp = np.zeros((2, 50, 50))
    ramp[1] = np.arange(50)[None, :] * 0.1  # u_col = 0.1 * col
    after = landmark_errors([[10.0, 15.5]], [[10.0, 17.05]], ramp)["after"]
    np.testing.assert_allclose(after, 0.0, atol=1e-12)


def test_tre_in_physical_units_uses_the_spacing_per_axis():
    fixed = np.zeros((2, 2))
    moving = np.array([[3.0, 0.0], [0.0, 4.0]])
    summary = tre_summary(fixed, moving, np.zeros((2, 8, 8)), spacing=(0.5, 2.0), unit="µm")
    assert summary["px"]["before"]["median"] == pytest.approx(3.5)
    # 3 rows of 0.5 = 1.5 µm, 4 columns of 2 = 8 µm
    assert summary["physical"]["before"]["median"] == pytest.approx((1.5 + 8.0) / 2)
    assert summary["unit"] == "µm" and summary["spacing"] == [0.5, 2.0]
    assert "µm" in format_tre(summary)


def test_landmarks_that_do_not_correspond_are_refused():
    with pytest.raises(ValueError, match="3 fixed and 2 moving"):
        landmark_errors(np.zeros((3, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        landmark_errors(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="no landmarks"):
        landmark_errors(np.zeros((0, 2)), np.zeros((0, 2)))


def test_an_image_finds_its_landmarks_layer_by_name():
    layers = [SimpleNamespace(name=n) for n in ("fixed B landmarks", "Fixed landmarks", "x")]
    assert matching_landmarks("fixed", layers) is layers[1]
    assert matching_landmarks("fixed B", layers) is layers[0]
    assert matching_landmarks("moving", layers) is None
    assert matching_landmarks(None, layers) is None


# ----------------------------------------------------------------------- in the widget


def _landmark_viewer(viewer, pair, scale=(1.0, 1.0)):
    """The pair with landmarks that the true field relates: fixed x, moving x + u(x)."""
    from napari_discreg.core.registration.geometry import sample_field

    viewer.add_image(pair.fixed, name="fixed", scale=scale)
    viewer.add_image(pair.moving, name="moving", scale=scale)
    rr, cc = np.mgrid[24:73:8, 24:73:8]
    fixed = np.stack([rr.ravel(), cc.ravel()], axis=1).astype(float)
    moving = fixed + sample_field(pair.displacement, fixed)
    viewer.add_points(moving, name="moving landmarks", scale=scale)
    viewer.add_points(fixed, name="fixed landmarks", scale=scale)
    return fixed, moving


def test_register_reports_the_landmarks_tre(viewer, tiny_model_path, small_pair, wait_job):
    from napari_discreg._widgets import RegisterWidget, state_for
    from napari_discreg._widgets._register_outputs import output_name

    fixed, moving = _landmark_viewer(viewer, small_pair)
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)
    # filled in by name: "<image> landmarks"
    assert widget.fixed_landmarks_combo.layer() is viewer.layers["fixed landmarks"]
    assert widget.moving_landmarks_combo.layer() is viewer.layers["moving landmarks"]
    wait_job(widget.run())
    run = state_for(viewer).run
    field = run.fields[None]
    before = np.hypot(*(moving - fixed).T)
    after = np.hypot(*(moving - fixed - sample_field(field, fixed)).T)
    tre = run.tre
    assert tre["landmarks"] == len(fixed) == 49
    assert tre["px"]["before"]["median"] == pytest.approx(np.median(before))
    assert tre["px"]["after"]["median"] == pytest.approx(np.median(after))
    assert tre["px"]["after"]["mean"] == pytest.approx(np.mean(after))
    assert "physical" not in tre
    text = widget.status_label.text()
    assert f"TRE (49 landmarks): median {np.median(before):.2f} → {np.median(after):.2f} px" in text
    # the outputs carry it in their metadata
    meta = viewer.layers[output_name(run, "warped")].metadata["napari_discreg"]
    assert meta["tre"]["px"] == tre["px"]
    # points that do not correspond: said in the status, registration still shown
    viewer.layers["moving landmarks"].data = moving[:-1]
    wait_job(widget.run())
    assert state_for(viewer).run.tre is None
    assert "48 moving points" in widget.status_label.text()
    # no landmarks chosen: nothing said about them
    widget.fixed_landmarks_combo.set_layer(None)
    wait_job(widget.run())
    assert "TRE" not in widget.status_label.text()
    assert "landmarks" not in widget.status_label.text()


def test_the_tre_in_physical_units_follows_the_layer_scale(
    viewer, tiny_model_path, small_pair, wait_job
):
    from napari_discreg._widgets import RegisterWidget, state_for

    fixed, moving = _landmark_viewer(viewer, small_pair, scale=(0.5, 0.5))
    widget = RegisterWidget(viewer)
    assert widget.load_checkpoint(tiny_model_path)
    wait_job(widget.run())
    tre = state_for(viewer).run.tre
    before = np.hypot(*(moving - fixed).T)
    # the points are in pixels of their images (the layers share the scale)
    assert tre["px"]["before"]["median"] == pytest.approx(np.median(before))
    assert tre["physical"]["before"]["median"] == pytest.approx(0.5 * np.median(before))
    assert tre["spacing"] == [0.5, 0.5]
    assert "scale units" in widget.status_label.text()
