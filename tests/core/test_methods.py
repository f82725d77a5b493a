"""The method table: what each deformable method runs, its settings and its steps."""

from __future__ import annotations

import pytest

import napari_discreg as nd
from napari_discreg.core.config import BSplineConfig, RefineConfig
from napari_discreg.core.learning.model import ModelConfig
from napari_discreg.core.memory import register_estimate
from napari_discreg.core.registration.methods import METHODS, method_named, resolve_method


def test_every_method_says_what_it_runs_and_takes():
    runs = {name: (m.network, m.optimiser, m.settings_type) for name, m in METHODS.items()}
    assert runs == {
        "network": (True, None, None),
        "bspline": (False, "bspline", BSplineConfig),
        "network+bspline": (True, "bspline", BSplineConfig),
        "network+adam": (True, "adam", RefineConfig),
        "none": (False, None, None),
    }
    assert nd.METHODS is METHODS and nd.DEFAULT_METHOD in METHODS
    assert all(m.description for m in METHODS.values())


def test_settings_and_planned_steps():
    adam = METHODS["network+adam"]
    assert adam.settings(None) == RefineConfig() and adam.settings(7) == RefineConfig(steps=7)
    assert adam.planned_steps(RefineConfig(steps=5, levels=1), (64, 64)) == 5
    spline = METHODS["bspline"]
    quick = BSplineConfig(levels=1, iterations=(3,))
    assert spline.settings(quick) is quick and spline.planned_steps(quick, (64, 64)) == 3
    assert METHODS["network"].planned_steps(None, (64, 64)) == 0
    with pytest.raises(ValueError, match="takes a BSplineConfig"):
        spline.settings(RefineConfig())
    with pytest.raises(ValueError, match="takes no refinement settings"):
        METHODS["none"].settings(3)
    with pytest.raises(ValueError, match="unknown method 'elastix'; choose one of network"):
        method_named("elastix")


def test_the_refine_forms_of_earlier_releases_still_choose_a_method():
    assert resolve_method(None, None)[0].name == nd.DEFAULT_METHOD
    assert resolve_method(None, False)[0].name == "network"
    assert resolve_method(None, 4) == (METHODS["network+adam"], RefineConfig(steps=4))
    assert resolve_method(None, BSplineConfig())[0].name == "bspline"
    with pytest.raises(TypeError, match="refine must be"):
        resolve_method(None, "yes")  # type: ignore[arg-type]


def test_memory_follows_what_the_method_runs():
    config, shape = ModelConfig(), (256, 256)
    need = {name: register_estimate(config, name, shape).bytes for name in METHODS}
    # the B-spline methods add their band of normal equations (core.memory.bspline_band_bytes)
    assert need["none"] < need["bspline"]
    assert need["network+adam"] < need["network+bspline"]
    assert need["network+adam"] > need["network"] > 0
