"""Fixtures of the widget tests: small images, a tiny untrained model, captured notifications.

Everything runs under Xvfb (pytest-xvfb) with napari's ``make_napari_viewer``. Images
are 96 x 96 and the model is tiny, so the suite stays fast on two CPU cores; only the
tests marked ``shipped_model`` use the pretrained weights shipped with the package.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_discreg import load_model, save_model
from napari_discreg.core.config import AdaptConfig, DataConfig, ModelConfig
from napari_discreg.core.data.template import fixed_test_pairs, load_template, make_pair
from napari_discreg.core.learning.model import DiscreteRegistrationNet

SMALL = 96
TINY = ModelConfig(num_labels=7, capture_range=3.0, stride=4, features=8, head_channels=16)
#: a fast adaptation: two pairs per batch, one step-C update, selection only at start/end
FAST_ADAPT = AdaptConfig(batch_size=2, generator_updates=1, select_every=10_000)
FAST_SOURCE = DataConfig(size=64)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shipped_model: needs the pretrained weights shipped in the package"
    )


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A small randomly initialised model saved as a checkpoint (heads differ, as they must)."""
    torch.manual_seed(0)
    model = DiscreteRegistrationNet(TINY)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(model, path)
    return path


@pytest.fixture
def tiny_model(tiny_model_path):
    return load_model(tiny_model_path, "cpu")


@pytest.fixture(scope="session")
def small_pair():
    """A 96 x 96 T1 fixed / T2-like moving pair with known field and labels."""
    config = DataConfig(size=SMALL)
    return make_pair(load_template(SMALL), 116, "t1", "t2", np.random.default_rng(1), config)


@pytest.fixture(scope="session")
def small_targets():
    """Two unlabelled target pairs as (2, 64, 64) stacks (centre crops of 96 x 96 pairs)."""
    config = DataConfig(size=SMALL)
    pairs = fixed_test_pairs(
        load_template(SMALL), config, n=2, fixed_contrast="t1", moving_contrast="t2", seed=0
    )
    crop = (slice(None), slice(16, 80), slice(16, 80))  # 64 x 64: adaptation is the slow part
    return np.stack([p.fixed for p in pairs])[crop], np.stack([p.moving for p in pairs])[crop]


@pytest.fixture
def fast():
    """Settings of a fast adaptation run: ``{"adapt_config": ..., "data_config": ...}``."""
    return {"adapt_config": FAST_ADAPT, "data_config": FAST_SOURCE}


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def notes(monkeypatch):
    """Messages the widgets showed as napari notifications: list of (level, text)."""
    from napari_discreg._widgets import _notify

    shown: list[tuple[str, str]] = []
    monkeypatch.setattr(_notify, "show_error", lambda msg: shown.append(("error", msg)))
    monkeypatch.setattr(_notify, "show_warning", lambda msg: shown.append(("warning", msg)))
    monkeypatch.setattr(_notify, "show_info", lambda msg: shown.append(("info", msg)))
    return shown


@pytest.fixture
def wait_job(qtbot):
    """``wait_job(job)``: wait until a widget job has finished and its handlers ran."""

    def wait(job, timeout=60_000):
        assert job is not None, "the widget did not start a job"
        qtbot.waitUntil(lambda: not job.is_running, timeout=timeout)

    return wait
