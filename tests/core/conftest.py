import pytest
import torch

from napari_discreg.core.checkpoint import default_weights_path
from napari_discreg.core.config import ModelConfig
from napari_discreg.core.model import DiscreteRegistrationNet

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
