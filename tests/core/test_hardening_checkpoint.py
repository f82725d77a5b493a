"""Hardening (issue 17, part A): checkpoints, configs and register() refuse what would
exhaust memory or give garbage, before allocating anything; register() leaves a shared
model alone and warns when the motion looks larger than the capture range."""

import json
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import napari_discreg as nd
from napari_discreg.core import memory
from napari_discreg.core.config import (
    AdaptConfig,
    BSplineConfig,
    DataConfig,
    ModelConfig,
    TrainConfig,
    parse_json,
)
from napari_discreg.core.files import checkpoint
from napari_discreg.core.learning.model import DiscreteRegistrationNet, mode_independent

TINY = ModelConfig(  # as tests/core/conftest.py's tiny model
    num_labels=5, capture_range=2.0, stride=4, features=4, head_channels=8, head_bottleneck=0
)


def _write(path, config: dict, tensors: dict, extra: str = "{}"):
    meta = {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "model_config": json.dumps(config),
        "extra": extra,
    }
    save_file(tensors, str(path), metadata=meta)
    return path


def _tiny_tensors():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in DiscreteRegistrationNet(TINY).state_dict().items()}


@pytest.fixture
def no_build(monkeypatch):
    """Building a real model during load fails the test: refusals must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the checkpoint was validated")

    monkeypatch.setattr(checkpoint, "DiscreteRegistrationNet", refuse)


BOMBS = {
    "num_labels=1001": {"num_labels": 1001},
    "num_labels=4001": {"num_labels": 4001},
    "features=30000": {"features": 30000},
    "head_channels=100000": {"head_channels": 100000},
    "stride=4.5": {"stride": 4.5},
    "stride=0": {"stride": 0},
    "capture_range=inf": {"capture_range": float("inf")},
    "capture_range=1e9": {"capture_range": 1e9},
    "temperature=nan": {"temperature": float("nan")},
    "temperature=inf": {"temperature": float("inf")},
    "num_labels='15'": {"num_labels": "15"},
}


@pytest.mark.parametrize("case", list(BOMBS))
def test_bad_config_refused_before_building(tmp_path, no_build, case):
    cfg = {**TINY.to_dict(), **BOMBS[case]}
    path = _write(tmp_path / "m.safetensors", cfg, _tiny_tensors())
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="model config in the checkpoint is invalid"):
        checkpoint.load_model(path, device="cpu")
    assert time.perf_counter() - t0 < 2


def test_many_weights_refused_before_building(tmp_path, no_build):
    # every field in range, but 2 x (3969 x 1024 x 9) head weights: 73 M parameters
    cfg = {**TINY.to_dict(), "num_labels": 63, "head_channels": 1024}
    path = _write(tmp_path / "m.safetensors", cfg, _tiny_tensors())
    with pytest.raises(ValueError, match="weights, more than"):
        checkpoint.load_model(path, device="cpu")


def test_shapes_checked_from_the_header_before_building(tmp_path, no_build):
    cfg = {**TINY.to_dict(), "num_labels": 7}  # the tensors are K = 5's
    path = _write(tmp_path / "m.safetensors", cfg, _tiny_tensors())
    with pytest.raises(ValueError, match="does not fit the napari-discreg architecture"):
        checkpoint.load_model(path, device="cpu")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused(tmp_path, value):
    tensors = _tiny_tensors()
    key = next(k for k in tensors if k.startswith("F1."))
    tensors[key].view(-1)[0] = value
    path = _write(tmp_path / "m.safetensors", TINY.to_dict(), tensors)
    with pytest.raises(ValueError, match="NaN or infinite"):
        checkpoint.load_model(path, device="cpu")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_integer_or_bool_weights_refused(tmp_path, dtype):
    tensors = _tiny_tensors()
    key = next(k for k in tensors if k.startswith("G."))
    tensors[key] = tensors[key].to(dtype)
    path = _write(tmp_path / "m.safetensors", TINY.to_dict(), tensors)
    with pytest.raises(ValueError, match="floating point"):
        checkpoint.load_model(path, device="cpu")


def test_float16_weights_still_load(tmp_path):
    tensors = {k: v.half() for k, v in _tiny_tensors().items()}
    path = _write(tmp_path / "m.safetensors", TINY.to_dict(), tensors)
    model = checkpoint.load_model(path, device="cpu")
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("where", ["model_config", "extra"])
def test_deeply_nested_json_refused(tmp_path, where):
    deep = "[" * 100_000 + "]" * 100_000
    cfg = json.dumps(TINY.to_dict()) if where == "extra" else deep
    path = tmp_path / "m.safetensors"
    meta = {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "model_config": cfg,
        "extra": deep if where == "extra" else "{}",
    }
    save_file(_tiny_tensors(), str(path), metadata=meta)
    with pytest.raises(ValueError, match="nested deeper"):
        checkpoint.read_checkpoint(path)


def test_parse_json_ignores_brackets_in_strings():
    assert parse_json('{"a": ["[[[[\\"", "]"]}', "x") == {"a": ['[[[["', "]"]}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_json("{", "x")


def test_shipped_models_validate():
    for name in ("default", "mono"):
        config, tensors, _ = checkpoint.read_checkpoint(checkpoint.shipped_model_path(name))
        assert config.num_labels == 15 and all(torch.isfinite(t).all() for t in tensors.values())


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    ("cls", "data", "match"),
    [
        (DataConfig, {"size": 8}, "smallest image register accepts"),
        (DataConfig, {"size": 20000}, "between 16 px"),
        (DataConfig, {"size": 64.5}, "whole number"),
        (DataConfig, {"train_slices": [30]}, "2 values"),
        (DataConfig, {"noise": float("nan")}, "finite"),
        (TrainConfig, {"batch_size": 0}, "batch_size"),
        (TrainConfig, {"lr": float("inf")}, "finite"),
        (AdaptConfig, {"steps": 10**12}, "at most"),
        (AdaptConfig, {"keep_best": "yes"}, "true or false"),
        (BSplineConfig, {"levels": 1000}, "levels"),
        (ModelConfig, {"num_labels": 15.5}, "whole number"),
    ],
)
def test_config_from_dict_validates(cls, data, match):
    with pytest.raises(ValueError, match=match):
        cls.from_dict(data)


def test_config_accepts_json_forms():
    assert DataConfig.from_dict({"size": 64.0}).size == 64
    assert isinstance(DataConfig.from_dict({"size": 64.0}).size, int)
    assert BSplineConfig.from_dict({"iterations": [2, 1]}).iterations == (2, 1)
    for cls in (ModelConfig, DataConfig, TrainConfig, AdaptConfig, BSplineConfig):
        assert cls.from_dict(cls().to_dict()) == cls()


def test_tampered_state_size_refused():
    # runs/ merges a state file's "size" with dataclasses.replace, which validates too
    with pytest.raises(ValueError, match="size"):
        replace(DataConfig(), size=20000)


# -------------------------------------------------------------------------- memory


def _wide_model():
    """K = 61 labels with 1 px spacing at stride 2: tiny weights, a huge cost volume."""
    cfg = ModelConfig(
        num_labels=61, capture_range=30.0, stride=2, features=4, head_channels=4, head_bottleneck=4
    )
    return DiscreteRegistrationNet(cfg).eval()


def _no_forward(model, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the network ran before the memory check")

    monkeypatch.setattr(model, "forward", refuse)


def test_register_refuses_what_needs_too_much_memory(monkeypatch):
    model = _wide_model()
    _no_forward(model, monkeypatch)
    img = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    need = memory.register_estimate(model.config, "network", (128, 128))
    assert need.gb > 0.5  # 4096 control points x 3721 labels
    with pytest.raises(ValueError, match=r"about \d+\.\d GB.*downsample") as err:
        nd.register(img, img, model=model, method="network", max_memory_gb=0.1)
    assert "0.1 GB (the limit given)" in str(err.value)
    monkeypatch.setenv(memory.ENV_LIMIT, "0.1")
    with pytest.raises(ValueError, match=memory.ENV_LIMIT):
        nd.register(img, img, model=model, method="network")


def test_memory_limit_capped_by_available(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    assert memory.memory_limit(100.0) == (10**9, "the memory available on this machine now")
    monkeypatch.setenv(memory.ENV_LIMIT, "abc")
    with pytest.raises(ValueError, match="not a number"):
        memory.memory_limit()


def test_network_pass_refuses_too_much_memory(monkeypatch):
    """Adaptation and training go through the model's own check (each pass)."""
    model = _wide_model().train()
    x = torch.rand(4, 1, 128, 128)
    monkeypatch.setenv(memory.ENV_LIMIT, "0.5")
    with pytest.raises(ValueError, match="network training pass over 4 pair"):
        model(x, x)


def test_default_model_estimates_are_modest():
    cfg = ModelConfig()
    assert memory.register_estimate(cfg, "network", (256, 256)).gb < 0.2
    assert memory.register_estimate(cfg, "bspline", (2048, 2048)).gb < 4
    assert memory.adaptation_estimate(cfg, (128, 128), 2).gb < 0.5


# -------------------------------------------------------------------- thread safety


def test_register_leaves_the_model_mode_alone_across_threads(tiny_model, monkeypatch):
    model = tiny_model.train()
    assert mode_independent(model)

    def refuse(*a, **k):
        raise AssertionError("register switched the caller's model mode")

    monkeypatch.setattr(model, "train", refuse)
    monkeypatch.setattr(model, "eval", refuse)
    rng = np.random.default_rng(1)
    pairs = [rng.random((48, 48)).astype(np.float32) for _ in range(4)]
    expected = [nd.register(p, p[::-1], model=model, method="network").displacement for p in pairs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(3):
                p = pairs[i]
                results[i] = nd.register(p, p[::-1], model=model, method="network").displacement
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert model.training
    for i in range(4):
        np.testing.assert_array_equal(results[i], expected[i])


def test_train_and_eval_mode_compute_the_same(tiny_model):
    x, y = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        a = tiny_model.train()(x, y)
        b = tiny_model.eval()(x, y)
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------- capture range


def test_capture_warning_fires_on_the_outer_ring_only():
    """Over-range motion shows as labels on the K x K grid's outer ring; a flat (unsure)
    histogram, as on an unfamiliar contrast, is no reason to warn."""
    from napari_discreg.core.registration.register import capture_range_check

    k, h, w = 15, 8, 8
    offsets = torch.linspace(-7, 7, k)
    image = torch.ones(1, 1, h * 4, w * 4)
    ring = torch.zeros(2, 1, h, w, k, k)
    ring[..., 7, 14] = 1.0  # every control point: +7 px in x, the largest bin
    assert "+/-7 px" in capture_range_check(ring, image, image, offsets, 4)
    flat = torch.full((2, 1, h, w, k, k), 1.0 / k**2)
    flat[..., 7, 8] += 0.01  # unsure, but the best label is near the centre
    assert capture_range_check(flat, image, image, offsets, 4) is None
    centre = torch.zeros(2, 1, h, w, k, k)
    centre[..., 7, 7] = 1.0
    assert capture_range_check(centre, image, image, offsets, 4) is None


@pytest.mark.parametrize("shift", [10, 15])
def test_motion_beyond_the_range_is_found_by_default(shipped_model, pair, shift):
    f = pair.fixed
    moving = np.roll(f, shift, axis=1)
    fg = f > 0.05 * f.max()
    res = nd.register(f, moving, model=shipped_model)  # default: pre-alignment first
    assert abs(res.displacement[1][fg].mean() - shift) < 1.0
    assert res.capture_warning is None


def test_identical_images_give_zero_with_the_guard(shipped_model, pair):
    f = pair.fixed
    for method in ("bspline", "network"):
        res = nd.register(f, f, model=shipped_model, method=method)
        assert np.abs(res.displacement).max() == 0.0, method


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested deeper"),
        ('{"step": 1e300, "optimizers": {}}', "corrupt"),
    ],
)
def test_tampered_training_state_refused(tmp_path, raw, match):
    from safetensors.torch import save_file

    from napari_discreg.core.files.resume import load_training_state

    meta = {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "model_config": json.dumps(TINY.to_dict()),
        "extra": "{}",
        "training_state": raw,
    }
    path = tmp_path / "s.safetensors"
    save_file(_tiny_tensors(), str(path), metadata=meta)
    with pytest.raises(ValueError, match=match):
        load_training_state(path)
