"""Issue 26 (hardening, second round): the cases fixed here, each reproduced first."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import napari_discreg as nd
from napari_discreg.core.config import ModelConfig
from napari_discreg.core.files.checkpoint import save_checkpoint
from napari_discreg.core.learning.model import DiscreteRegistrationNet, resolve_device

TINY = ModelConfig(num_labels=5, capture_range=2, features=4, head_channels=8)


def test_a_checkpoint_replaced_with_the_same_mtime_loads_the_new_weights(tmp_path):
    """``cp -p`` / ``rsync -a`` keep the modification time: the cache must see the bytes."""
    torch.manual_seed(0)
    a = save_checkpoint(DiscreteRegistrationNet(TINY), tmp_path / "a.safetensors")
    torch.manual_seed(1)
    b = save_checkpoint(DiscreteRegistrationNet(TINY), tmp_path / "b.safetensors")
    target = tmp_path / "model.safetensors"
    shutil.copy2(a, target)
    first = nd.load_model(target)
    stat = os.stat(target)
    shutil.copy2(b, target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime as before
    second = nd.load_model(target)
    expected = nd.load_model(b)
    for q, r in zip(second.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(q, r)
    pairs = zip(first.parameters(), second.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in pairs)


@pytest.mark.parametrize("device", ["meta", "xla", 7, "npu", "cuda:99x"])
def test_unusable_devices_are_clear_errors(device):
    with pytest.raises(ValueError, match="device"):
        resolve_device(device)


def test_device_names_in_any_case():
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(" auto ").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available; use 'auto' or 'cpu'"):
            resolve_device("cuda")


def test_absurd_limits_are_one_line_errors(monkeypatch):
    import numpy as np

    from napari_discreg.core.files import imagefiles

    img = np.random.default_rng(0).random((48, 48))
    with pytest.raises(ValueError, match="at most 1e\\+15 GB"):
        nd.register(img, img, max_memory_gb=1e300)
    monkeypatch.setenv("NAPARI_DISCREG_MAX_VOXELS", "9" * 400)
    with pytest.raises(ValueError, match="400-digit number"):
        imagefiles.max_voxels(None)


def test_the_partial_model_of_an_interrupted_run_never_replaces_the_input(tmp_path, capsys):
    """Issue 26 item 1: ``adapt --model A.partial.safetensors -o A.safetensors`` with A
    present would write "the best weights seen" over its own input on Ctrl-C."""
    from napari_discreg.cli import main

    torch.manual_seed(0)
    model = save_checkpoint(DiscreteRegistrationNet(TINY), tmp_path / "A.partial.safetensors")
    out = save_checkpoint(DiscreteRegistrationNet(TINY), tmp_path / "A.safetensors")
    before = model.read_bytes()
    argv = ["adapt", "--model", str(model), "-o", str(out), "--demo-target", "2", "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "would overwrite the input --model" in err and "interrupted run" in err
    assert model.read_bytes() == before


def test_a_truncated_results_file_loses_no_results(tmp_path, capsys):
    """Issue 26 item 3: a ``benchmarks.json`` cut short by a killed run is set aside with a
    warning naming it; the new results are written (atomically) all the same."""
    import json

    from adaptation import read_results

    path = tmp_path / "benchmarks.json"
    path.write_text('{"adaptation": {"rows": [1, ')
    assert read_results(path) == {}
    assert "benchmarks.json could not be read" in capsys.readouterr().err
    assert (tmp_path / "benchmarks.json.corrupt").read_text().startswith('{"adaptation"')
    assert not path.exists()
    path.write_text(json.dumps({"speed": {"x": 1}}))
    assert read_results(path) == {"speed": {"x": 1}}


@pytest.mark.parametrize("method", ["none", "bspline"])
def test_lazy_probabilities_use_the_weights_of_registration_time(tiny_model, method):
    """Before: computed on first read, they came from the weights of that moment (after
    6 adaptation steps they differed by up to 0.82 from those at registration)."""
    import copy

    from napari_discreg import register

    rng = np.random.default_rng(0)
    fixed = rng.random((48, 48)).astype(np.float32)
    moving = np.roll(fixed, 1, axis=0)
    before = copy.deepcopy(tiny_model)
    result = register(fixed, moving, model=tiny_model, method=method, prealign="none")
    with torch.no_grad():  # an adaptation changes the weights in place meanwhile
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p))
    reference = register(fixed, moving, model=before, method=method, prealign="none")
    np.testing.assert_array_equal(result.probabilities, reference.probabilities)


def test_template_commands_take_the_memory_limit(tmp_path, capsys):
    """Before: ``demo --size 2048 --max-memory-gb 1`` reached 3.5 GB, then an
    _ArrayMemoryError traceback; ``adapt --demo-target 300000`` was never refused."""
    from napari_discreg.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--size", "2048", "--max-memory-gb", "1"]) == 2
    err = capsys.readouterr().err
    assert "building the 2048 px template would need about 47.6 GB" in err, err
    assert not out.exists()
    model = str(tmp_path / "m.safetensors")
    argv = ["adapt", "-o", model, "--demo-target", "300000", "--size", "64"]
    assert main([*argv, "--max-memory-gb", "1"]) == 2
    err = capsys.readouterr().err
    assert "and 300000 pairs from it would need about" in err and "fewer built-in pairs" in err


def test_the_template_cache_is_bounded(monkeypatch):
    from napari_discreg.core.data import template as data

    monkeypatch.setattr(data, "_TEMPLATES", type(data._TEMPLATES)())
    monkeypatch.setattr(data, "TEMPLATE_CACHE_BYTES", 1)
    a = data.load_template(16)
    assert data.load_template(16) is a  # reused
    data.load_template(24)
    assert list(data._TEMPLATES) == [24]  # over the budget: only the newest is kept


def test_the_memory_limit_is_a_spec_field_of_every_run(tmp_path, capsys, monkeypatch):
    """--max-memory-gb reaches the runs as their spec's max_memory_gb (no environment
    variable set around the command): training is refused before its first step."""
    from napari_discreg.cli import main

    monkeypatch.delenv("NAPARI_DISCREG_MAX_MEMORY_GB", raising=False)
    out = tmp_path / "m.safetensors"
    argv = ["train", "-o", str(out), "--steps", "1", "--size", "48", "--max-memory-gb", "1e-6"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "training on 48 x 48 px pairs, batches of" in err and "the limit given" in err
    assert not out.exists() and "NAPARI_DISCREG_MAX_MEMORY_GB" not in os.environ
