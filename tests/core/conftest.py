import numpy as np
import pytest
import torch

from napari_discreg.core.config import DataConfig, ModelConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files.checkpoint import default_weights_path, save_checkpoint
from napari_discreg.core.learning.model import DiscreteRegistrationNet

TINY = ModelConfig(  # no bottleneck: the tiny heads are narrower than one
    num_labels=5, capture_range=2.0, stride=4, features=4, head_channels=8, head_bottleneck=0
)


@pytest.fixture
def tiny_config():
    return TINY


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return DiscreteRegistrationNet(TINY).eval()


@pytest.fixture(scope="session")
def shipped_model():
    from napari_discreg import load_model

    if not default_weights_path().is_file():  # pragma: no cover - the weights ship with the package
        pytest.fail("the shipped weights are missing; run scripts/train_shipped_model.py")
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def pair():
    """A 96 x 96 T1 fixed / T2-like moving pair (slice 110, up to 4.5 px motion) with its field."""
    cfg = DataConfig(size=96, max_displacement=4.5)
    template = data.load_template(cfg.size)
    return data.make_pair(template, 110, "t1", "t2", np.random.default_rng(3), cfg)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A small random model (K = 5, +/-2 px) saved as a checkpoint: the command-line
    tests' stand-in for the shipped weights."""
    torch.manual_seed(0)
    model = DiscreteRegistrationNet(
        ModelConfig(num_labels=5, capture_range=2, features=4, head_channels=8)
    )
    return save_checkpoint(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")
