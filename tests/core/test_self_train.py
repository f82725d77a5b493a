"""Self-training on refined fields (the default adaptation): what it learns and what it
leaves alone, its mirrored pairs, and a resume as exact as MCD's.

Its accuracy is a benchmark (benchmarks/short_adaptation.py, docs/benchmarks.md), not a
test: these run a tiny model on 64 px pairs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_discreg as nd
from napari_discreg.core.config import AdaptConfig, DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files.resume import load_adaptation_state, save_adaptation_state
from napari_discreg.core.learning.adapt import AdaptState
from napari_discreg.core.learning.model import clone_model
from napari_discreg.core.learning.self_train import mirrored_labels, trainable_parameters
from napari_discreg.core.registration.label_grid import soft_labels

CFG = DataConfig(size=64)
FAST = AdaptConfig(steps=6, select_every=2, pseudo_levels=1)


@pytest.fixture(scope="module")
def target():
    template = data.load_template(CFG.size)
    pairs = data.fixed_test_pairs(
        template, CFG, n=4, fixed_contrast="t1", moving_contrast="t2", seed=0
    )
    return np.stack([p.fixed for p in pairs]), np.stack([p.moving for p in pairs])


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_default_adaptation_is_self_training_and_mcd_stays_selectable():
    assert AdaptConfig().method == "self-training"
    mcd = AdaptConfig.mcd()
    assert (mcd.method, mcd.steps, mcd.lr) == ("mcd", 36, 2e-4)
    assert AdaptConfig.for_method("mcd", steps=3) == AdaptConfig.mcd(steps=3)
    # a config recorded before self-training existed was an MCD run
    old = {k: v for k, v in AdaptConfig.mcd().to_dict().items() if k != "method"}
    assert AdaptConfig.from_dict(old).method == "mcd"
    with pytest.raises(ValueError, match="unknown adaptation method"):
        AdaptConfig(method="dann")


def test_mirrored_labels_are_the_labels_of_the_mirrored_field():
    rng = np.random.default_rng(0)
    k, q = 7, 3.0
    field = torch.from_numpy(rng.uniform(-2.5, 2.5, (2, 2, 5, 6)).astype(np.float32))
    labels = soft_labels(field, k, q).flatten(-2)
    mirrored = field.flip(-1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    expected = soft_labels(mirrored, k, q).flatten(-2)
    torch.testing.assert_close(mirrored_labels(labels, k), expected)


def test_only_the_heads_after_their_first_layer_learn(tiny_model, target):
    start = _weights(tiny_model)
    records = list(nd.adapt_steps(tiny_model, *target, config=FAST, device="cpu"))
    assert [r.iteration for r in records] == list(range(7))
    assert all("pseudo_label_ce" in r.losses for r in records[1:])
    trained = {id(p) for p in trainable_parameters(tiny_model)}
    names = {n for n, p in tiny_model.named_parameters() if id(p) in trained}
    assert names and all(n.startswith(("F1.", "F2.")) for n in names)
    assert not any(".net.0." in n for n in names)
    after = _weights(tiny_model)
    frozen = [n for n, _ in tiny_model.named_parameters() if n not in names]
    assert all(torch.equal(after[n], start[n]) for n in frozen)
    if records[-1].best_iteration:  # kept weights from a later iteration: the heads moved
        assert any(not torch.equal(after[n], start[n]) for n in names)
    assert all(p.requires_grad for p in tiny_model.parameters())  # unfrozen afterwards


def test_a_resumed_self_training_run_is_bit_identical(tmp_path, tiny_model, target):
    whole = clone_model(tiny_model)
    ref = list(nd.adapt_steps(whole, *target, config=FAST, device="cpu"))

    first, state = clone_model(tiny_model), AdaptState()
    gen = nd.adapt_steps(first, *target, config=FAST, device="cpu", state=state)
    for record in gen:
        if record.iteration == 3:
            break
    gen.close()
    extra = {"adaptation": {"config": FAST.to_dict()}}
    path = save_adaptation_state(
        tmp_path / "s.state.safetensors", first, state, extra, running=False
    )
    resumed, loaded, _ = load_adaptation_state(path, FAST.lr, device="cpu")
    assert loaded.pseudo_targets is not None
    torch.testing.assert_close(loaded.pseudo_targets, state.pseudo_targets)
    rest = list(nd.adapt_steps(resumed, *target, config=FAST, device="cpu", state=loaded))
    assert [r.iteration for r in rest] == [3, 4, 5, 6]
    assert [r.losses for r in rest[1:]] == [r.losses for r in ref[4:]]
    assert _same(resumed.state_dict(), whole.state_dict())


def test_stop_inside_a_run_keeps_the_best(tiny_model, target):
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    records = list(nd.adapt_steps(tiny_model, *target, config=FAST, device="cpu", should_stop=stop))
    assert records[-1].iteration < FAST.steps
    assert all(p.requires_grad for p in tiny_model.parameters())
