"""Network, register API, checkpoints: behaviour a user relies on."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import napari_discreg as nd
from napari_discreg.core.config import DataConfig, ModelConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files.checkpoint import load_model, read_checkpoint, save_checkpoint
from napari_discreg.core.learning.evaluate import evaluate_model, identity_metrics, summarise
from napari_discreg.core.learning.model import DiscreteRegistrationNet, resolve_device
from napari_discreg.core.registration.metrics import normalised_mutual_information

RNG = np.random.default_rng(12345)


def test_heads_start_different_and_output_histograms(tiny_model):
    w1 = torch.cat([p.flatten() for p in tiny_model.F1.net.parameters()])
    w2 = torch.cat([p.flatten() for p in tiny_model.F2.net.parameters()])
    assert not torch.allclose(w1, w2)
    x = torch.rand(2, 1, 32, 24)
    l1, l2 = tiny_model(x, x)
    assert l1.shape == l2.shape == (2, 8, 6, 5, 5)
    assert not torch.allclose(l1, l2)


def test_network_rejects_unpadded_input(tiny_model):
    with pytest.raises(ValueError, match="multiples of the stride"):
        tiny_model(torch.rand(1, 1, 30, 32), torch.rand(1, 1, 30, 32))


def test_register_result_shapes_and_conventions(tiny_model):
    rng = np.random.default_rng(0)
    fixed = rng.random((37, 50))
    res = nd.register(fixed, fixed * 3 + 1, model=tiny_model)
    assert res.displacement.shape == (2, 37, 50) and res.displacement.dtype == np.float32
    assert res.warped.shape == (37, 50)
    h, w = -(-37 // 4), -(-50 // 4)
    assert res.probabilities.shape == (2, h, w, 5, 5)
    np.testing.assert_allclose(res.probabilities.sum((-1, -2)), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.offsets, np.linspace(-2, 2, 5))
    assert res.discrepancy.shape == (h, w) and (res.discrepancy >= 0).all()
    assert res.labels.shape == (h, w)
    assert res.control_point(0, 0) == (0, 0)
    assert res.control_point(36, 49) == (h - 1, w - 1)
    assert res.control_point_position(1, 2) == (5.5, 9.5)


def test_register_warps_original_intensities(tiny_model):
    rng = np.random.default_rng(1)
    fixed = rng.random((32, 32)).astype(np.float32)
    moving = (rng.random((32, 32)) * 1000).astype(np.uint16)
    res = nd.register(fixed, moving, model=tiny_model)
    from napari_discreg.core.registration.warp import warp_numpy

    np.testing.assert_allclose(
        res.warped, warp_numpy(moving.astype(np.float32), res.displacement), rtol=1e-5, atol=1e-2
    )


@pytest.mark.parametrize(
    ("fixed", "moving", "match"),
    [
        (RNG.random((32, 32, 5)), RNG.random((32, 32)), "2D image"),
        (RNG.random((4, 32, 32)), RNG.random((4, 32, 32)), "2D image"),
        (RNG.random(32), RNG.random(32), "2D image"),
        (np.full((32, 32), np.nan), RNG.random((32, 32)), "NaN"),
        (RNG.random((32, 32)), np.where(np.eye(32) > 0, np.inf, 1.0), "NaN or infinite"),
        (np.full((32, 32), 5.0), RNG.random((32, 32)), "constant"),
        (RNG.random((8, 8)), RNG.random((8, 8)), "smaller than the model's label range"),
        (np.array([["a"]]), np.array([["b"]]), "numeric"),
    ],
)
def test_register_bad_input_raises_clear_value_error(tiny_model, fixed, moving, match):
    with pytest.raises(ValueError, match=match):
        nd.register(fixed, moving, model=tiny_model)


def test_register_accepts_odd_dtypes_and_strides(tiny_model):
    rng = np.random.default_rng(2)
    base = rng.random((40, 40))
    for arr in (
        base > 0.5,
        (base * 255).astype(np.uint8),
        base.astype(np.float16),
        base[::-1, ::-1],
        np.asfortranarray(base),
    ):
        res = nd.register(arr, base, model=tiny_model)
        assert np.isfinite(res.displacement).all()


def test_register_does_not_modify_inputs(tiny_model):
    fixed = np.random.default_rng(3).random((32, 32))
    keep = fixed.copy()
    nd.register(fixed, fixed[::-1].copy(), model=tiny_model)
    np.testing.assert_array_equal(fixed, keep)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ----------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path, tiny_model, tiny_config):
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors", extra={"note": "x"})
    loaded = load_model(path, device="cpu")
    assert loaded.config == tiny_config
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert read_checkpoint(path)[2] == {"note": "x"}


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/napari_discreg_pwned", "w"))


def test_pickle_checkpoint_is_refused_without_running_code(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        load_model(path)
    import os

    assert not os.path.exists("/tmp/napari_discreg_pwned")


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path, tiny_model, tiny_config):
    good = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable"):
        load_model(truncated)
    foreign = tmp_path / "f.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a napari-discreg checkpoint"):
        load_model(foreign)
    # right format, wrong K: config says K=7 but tensors are for K=5
    wrong_k = tmp_path / "k.safetensors"
    meta = {
        "format": "napari-discreg",
        "format_version": "1",
        "model_config": json.dumps({**tiny_config.to_dict(), "num_labels": 7}),
        "extra": "{}",
    }
    save_file(
        {k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(wrong_k), metadata=meta
    )
    with pytest.raises(ValueError, match="does not fit"):
        load_model(wrong_k)
    bad_cfg = tmp_path / "c.safetensors"
    save_file(
        {"w": torch.zeros(1)},
        str(bad_cfg),
        metadata={**meta, "model_config": json.dumps({"num_labels": 4})},
    )
    with pytest.raises(ValueError, match="odd"):
        load_model(bad_cfg)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_shipped_models_load_by_name(tmp_path, monkeypatch):
    from napari_discreg.core.config import SHIPPED_MODELS
    from napari_discreg.core.files.checkpoint import (
        checkpoint_info,
        checkpoint_path,
        shipped_model_path,
    )

    assert checkpoint_path(None) == shipped_model_path("default")
    for name, (file, _) in SHIPPED_MODELS.items():
        path = shipped_model_path(name)
        assert path.name == file and checkpoint_path(name) == path
        if not path.is_file():  # the adapted models ship once trained (TRAINING.md)
            continue
        model = load_model(name, device="cpu")
        assert model.config == read_checkpoint(path)[0]
        info = checkpoint_info(name)
        assert info["model_config"] == model.config.to_dict()
        assert path.with_suffix(".json").is_file(), f"{name}: no training record beside it"
    with pytest.raises(ValueError, match="no shipped model 'nope'"):
        shipped_model_path("nope")
    with pytest.raises(ValueError, match="does not exist"):
        load_model("nope")
    # a file in the working directory that is called like a shipped model wins
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mono").write_bytes(b"not a checkpoint")
    assert checkpoint_path("mono") == Path("mono")
    with pytest.raises(ValueError, match="not a readable"):
        load_model("mono")


def test_every_config_round_trips_through_json():
    from napari_discreg.core import config as config_mod

    classes = [
        c
        for c in vars(config_mod).values()
        if isinstance(c, type) and issubclass(c, config_mod.Config) and c is not config_mod.Config
    ]
    assert len(classes) == 7
    for cls in classes:
        default = cls()
        assert cls.from_dict(json.loads(json.dumps(default.to_dict()))) == default
        with pytest.raises(ValueError, match=f"unknown {cls.__name__} field"):
            cls.from_dict({"bogus": 1})
        with pytest.raises(ValueError, match="must be a mapping"):
            cls.from_dict([1, 2])


def test_config_validation():
    with pytest.raises(ValueError, match="odd"):
        ModelConfig(num_labels=4)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"num_labels": 5, "bogus": 1})


# ------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def mono_pairs():
    cfg = DataConfig()
    template = data.load_template(cfg.size)
    return data.fixed_test_pairs(
        template, cfg, n=6, fixed_contrast="t1", moving_contrast="t1", seed=7
    )


def test_shipped_model_loads_without_download(shipped_model):
    assert isinstance(shipped_model, DiscreteRegistrationNet)
    assert shipped_model.config.num_labels == 15


def test_identical_images_give_near_zero_field(shipped_model, mono_pairs):
    img = mono_pairs[0].moving
    res = nd.register(img, img, model=shipped_model)
    assert np.abs(res.displacement).mean() < 0.25
    # and the default model path gives the same answer as an explicitly loaded model
    np.testing.assert_allclose(nd.register(img, img).displacement, res.displacement, atol=1e-5)


def test_known_field_recovered_on_held_out_mono_modal_pairs(shipped_model, mono_pairs):
    cfg = shipped_model.config
    model_epe = summarise(evaluate_model(shipped_model, mono_pairs))["epe"]
    identity_epe = summarise(
        identity_metrics(mono_pairs, cfg.stride, cfg.num_labels, cfg.capture_range)
    )["epe"]
    assert identity_epe > 1.2
    assert model_epe < 0.6


def test_registration_improves_mutual_information(shipped_model, mono_pairs):
    pair = mono_pairs[1]
    res = nd.register(pair.fixed, pair.moving, model=shipped_model)
    mask = pair.mask > 0
    before = normalised_mutual_information(pair.fixed, pair.moving, mask)
    after = normalised_mutual_information(pair.fixed, res.warped, mask)
    assert after > before
