"""Resumable training states: safetensors tensors + JSON metadata, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from napari_discreg.core.config import ModelConfig
from napari_discreg.core.files.checkpoint import OPTIMIZER_PREFIX, load_model, save_checkpoint
from napari_discreg.core.files.resume import load_training_state, save_training_state
from napari_discreg.core.learning.model import DiscreteRegistrationNet
from napari_discreg.core.learning.train import train_steps


def _step(model, *opts):
    x = torch.rand(2, 1, 32, 32)
    logits1, logits2 = model(x, x)
    (logits1.square().mean() + logits2.mean()).backward()
    for opt in opts:
        opt.step()
        opt.zero_grad()


def test_round_trip_of_weights_optimisers_and_step(tmp_path, tiny_model, tiny_config):
    heads = [*tiny_model.F1.parameters(), *tiny_model.F2.parameters()]
    opt_g = torch.optim.Adam(tiny_model.G.parameters(), lr=1e-3)
    opt_f = torch.optim.Adam(heads, lr=torch.tensor(2e-3), betas=(0.5, 0.9))  # a tensor lr
    _step(tiny_model, opt_g, opt_f)
    path = save_training_state(
        tmp_path / "s.safetensors", tiny_model, {"g": opt_g, "f": opt_f}, 7, {"note": "x"}
    )
    with safe_open(str(path), framework="pt") as f:  # plain safetensors: tensors + strings
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith(OPTIMIZER_PREFIX + "g/") for k in keys)
    assert json.loads(meta["training_state"])["step"] == 7

    torch.manual_seed(1)
    model = DiscreteRegistrationNet(tiny_config)
    new_g = torch.optim.Adam(model.G.parameters(), lr=1.0)
    new_f = torch.optim.Adam([*model.F1.parameters(), *model.F2.parameters()], lr=1.0)
    state = load_training_state(path, model, {"g": new_g, "f": new_f})
    assert state.step == 7 and state.extra == {"note": "x"} and state.optimizers == ["g", "f"]
    for a, b in zip(tiny_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for old, new in ((opt_g, new_g), (opt_f, new_f)):
        so, sn = old.state_dict(), new.state_dict()
        assert so["param_groups"][0]["betas"] == sn["param_groups"][0]["betas"]
        assert float(so["param_groups"][0]["lr"]) == float(sn["param_groups"][0]["lr"])
        for i in so["state"]:
            for key, value in so["state"][i].items():
                assert torch.equal(value, sn["state"][i][key])
    # both continue identically
    torch.manual_seed(5)
    _step(tiny_model, opt_g, opt_f)
    torch.manual_seed(5)
    _step(model, new_g, new_f)
    for a, b in zip(tiny_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the state is a usable model, and loads without a model given
    assert load_model(path).config == tiny_config
    assert load_training_state(path).model.config == tiny_config


def test_errors_are_clear(tmp_path, tiny_model):
    opt = torch.optim.Adam(tiny_model.parameters())
    _step(tiny_model, opt)
    path = save_training_state(tmp_path / "s.safetensors", tiny_model, {"adam": opt}, 1)
    with pytest.raises(ValueError, match="no state for optimiser 'sgd'"):
        load_training_state(path, tiny_model, {"sgd": opt})
    wrong = torch.optim.Adam(tiny_model.G.parameters())
    with pytest.raises(ValueError, match="does not fit the one given"):
        load_training_state(path, tiny_model, {"adam": wrong})
    other = DiscreteRegistrationNet(ModelConfig(num_labels=3, features=4, head_channels=8))
    with pytest.raises(ValueError, match="holds a model with config"):
        load_training_state(path, other)
    plain = save_checkpoint(tiny_model, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="without a training state"):
        load_training_state(plain)
    (tmp_path / "x.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickled .pt/.pth files are refused"):
        load_training_state(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="without '/'"):
        save_training_state(tmp_path / "t.safetensors", tiny_model, {"a/b": opt}, 1)


def test_train_steps_resumes_the_learning_rate_schedule(tiny_model):
    from napari_discreg.core.config import TrainConfig

    cfg = TrainConfig(steps=12, lr=0.1)
    batch = {
        "fixed": torch.rand(1, 1, 32, 32),
        "moving": torch.rand(1, 1, 32, 32),
        "displacement": torch.zeros(1, 2, 32, 32),
        "mask": torch.ones(1, 1, 32, 32),
    }

    def lrs(start):
        opt = torch.optim.Adam(tiny_model.parameters(), lr=cfg.lr)
        seen = []
        for _ in train_steps(
            tiny_model,
            config=cfg,
            batches=iter([batch] * 12),
            device="cpu",
            optimizer=opt,
            start_step=start,
        ):
            seen.append(opt.param_groups[0]["lr"])
        return seen

    assert lrs(6) == lrs(0)[6:]
    with pytest.raises(ValueError, match="start_step"):
        next(train_steps(tiny_model, config=cfg, start_step=13))
