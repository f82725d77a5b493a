"""MCD adaptation on a tiny model: mechanics, stopping, safety."""

import numpy as np
import pytest
import torch

import napari_discreg as nd
from napari_discreg.core.config import AdaptConfig, DataConfig, TrainConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.learning.adapt import AdaptState
from napari_discreg.core.learning.model import clone_model
from napari_discreg.core.learning.train import train_steps

RNG = np.random.default_rng(12345)

CFG = DataConfig(size=64)
FAST = AdaptConfig.mcd(batch_size=2, select_every=2, generator_updates=2, lr=1e-3)


@pytest.fixture(scope="module")
def target():
    template = data.load_template(CFG.size)
    pairs = data.fixed_test_pairs(
        template, CFG, n=3, fixed_contrast="t1", moving_contrast="t2", seed=0
    )
    return np.stack([p.fixed for p in pairs]), np.stack([p.moving for p in pairs])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def run(model, target, **kw):
    kw.setdefault("config", FAST)
    return list(nd.adapt_steps(model, *target, data_config=CFG, device="cpu", **kw))


@pytest.mark.parametrize("kind", ["l1", "swd", "pemd", "pemd16", "pemd16+"])
def test_step_c_lowers_target_discrepancy_and_changes_g_only_in_the_adapted_copy(
    tiny_model, target, kind
):
    frozen = clone_model(tiny_model)
    before = _state(tiny_model)
    cfg = AdaptConfig.mcd(
        batch_size=2,
        select_every=4,
        generator_updates=4,
        lr=1e-3,
        source_weight_c=0.0,
        keep_best=False,
        source_augmentation=False,
    )
    records = run(tiny_model, target, discrepancy=kind, steps=4, config=cfg)
    assert [r.iteration for r in records] == [0, 1, 2, 3, 4]
    if kind.startswith("pemd"):
        # G's updates in step C make the heads agree more on the target batch. (On this tiny,
        # untrained model L1 and SWD are ~1e-5 and move by noise only, so only the pEMDs are
        # checked.)
        drops = [r.losses["discrepancy_c"] - r.losses["discrepancy_c_first"] for r in records[1:]]
        assert np.mean(drops) < 0, drops
    g_keys = [k for k in before if k.startswith("G.")]
    assert any(not torch.equal(before[k], tiny_model.state_dict()[k]) for k in g_keys)
    assert _same(before, frozen.state_dict())  # the copy is untouched


def test_deterministic_for_a_fixed_seed(tiny_model, target):
    a, b = clone_model(tiny_model), clone_model(tiny_model)
    cfg = AdaptConfig.mcd(batch_size=2, select_every=2, generator_updates=1, keep_best=False)
    ra = run(a, target, discrepancy="swd", steps=2, seed=3, config=cfg)
    rb = run(b, target, discrepancy="swd", steps=2, seed=3, config=cfg)
    assert [r.losses for r in ra] == [r.losses for r in rb]
    assert _same(a.state_dict(), b.state_dict())


def test_keep_best_never_ends_worse_on_the_criterion(tiny_model, target):
    records = run(tiny_model, target, discrepancy="pemd", steps=4)
    scores = {r.iteration: r.criterion for r in records if r.criterion is not None}
    best = records[-1].best_iteration
    assert scores[best] == max(scores.values())
    assert scores[best] >= scores[0]


def test_closing_the_generator_stops_after_a_complete_iteration(tiny_model, target):
    cfg = AdaptConfig.mcd(batch_size=2, select_every=100, generator_updates=1, keep_best=False)
    gen = nd.adapt_steps(tiny_model, *target, steps=50, config=cfg, data_config=CFG, device="cpu")
    seen = [next(gen).iteration for _ in range(3)]
    gen.close()
    assert seen == [0, 1, 2]
    with pytest.raises(StopIteration):
        next(gen)


def test_nan_loss_stops_and_restores_weights(tiny_model, target):
    before = _state(tiny_model)
    with torch.no_grad():  # poison a head weight halfway: the next loss becomes NaN
        gen = nd.adapt_steps(
            tiny_model, *target, steps=5, config=FAST, data_config=CFG, device="cpu"
        )
        next(gen)
        tiny_model.F1.net[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="restored"):
        list(gen)
    assert _same(before, tiny_model.state_dict())


def test_adapt_runs_to_the_end_and_returns_the_model(tiny_model, target):
    out = nd.adapt(
        tiny_model, *target, discrepancy="l1", steps=1, config=FAST, data_config=CFG, device="cpu"
    )
    assert out is tiny_model


@pytest.mark.parametrize(
    ("fixed", "moving", "match"),
    [
        (RNG.random((2, 32, 32)), RNG.random((3, 32, 32)), "same shape"),
        (RNG.random((2, 2, 32, 32)), RNG.random((2, 2, 32, 32)), r"\(N, H, W\)"),
        (np.full((2, 32, 32), np.nan), RNG.random((2, 32, 32)), "NaN"),
    ],
)
def test_bad_target_input(tiny_model, fixed, moving, match):
    with pytest.raises(ValueError, match=match):
        run(tiny_model, (fixed, moving), steps=1)


def test_unknown_discrepancy(tiny_model, target):
    with pytest.raises(ValueError, match="unknown discrepancy"):
        run(tiny_model, target, discrepancy="kl", steps=1)


def test_source_training_lowers_the_loss(tiny_model):
    cfg = TrainConfig(steps=12, batch_size=2, lr=3e-3, source_contrasts=("t1",))
    losses = [
        r.losses["loss"] for r in train_steps(tiny_model, config=cfg, data_config=CFG, device="cpu")
    ]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


def test_resume_from_a_saved_state_is_bit_identical_to_an_uninterrupted_run(
    tmp_path, tiny_model, target
):
    from napari_discreg.core.files.resume import load_adaptation_state, save_adaptation_state
    from napari_discreg.core.learning.adapt import AdaptState

    cfg = AdaptConfig.mcd(
        batch_size=2, select_every=2, generator_updates=2, lr=1e-3, keep_best=True
    )
    whole = clone_model(tiny_model)
    ref = run(whole, target, discrepancy="swd", steps=5, config=cfg)

    first, state = clone_model(tiny_model), AdaptState()
    gen = nd.adapt_steps(
        first, *target, discrepancy="swd", steps=5, config=cfg, data_config=CFG, state=state
    )
    for record in gen:
        if record.iteration == 3:
            break
    gen.close()  # the model now holds the best weights, the state the current ones
    assert state.step == 3 and state.weights is not None
    path = save_adaptation_state(tmp_path / "a.state.safetensors", first, state, {}, running=False)

    resumed, loaded, _ = load_adaptation_state(path, cfg.lr, device="cpu")
    assert _same(resumed.state_dict(), state.weights)
    assert _same(loaded.best_weights, state.best_weights)
    assert (loaded.best_iteration, loaded.best_score) == (state.best_iteration, state.best_score)
    rest = run(resumed, target, discrepancy="swd", steps=5, config=cfg, state=loaded)
    assert rest[0].iteration == 3 and [r.iteration for r in rest[1:]] == [4, 5]
    assert [r.losses for r in rest[1:]] == [r.losses for r in ref[4:]]
    assert rest[-1].best_iteration == ref[-1].best_iteration
    assert _same(resumed.state_dict(), whole.state_dict())


def test_a_state_saved_while_running_holds_the_current_weights(tmp_path, tiny_model, target):
    from napari_discreg.core.files.resume import load_adaptation_state, save_adaptation_state
    from napari_discreg.core.learning.adapt import AdaptState

    state = AdaptState()
    gen = nd.adapt_steps(
        tiny_model, *target, steps=4, config=FAST, data_config=CFG, device="cpu", state=state
    )
    next(gen), next(gen), next(gen)  # iterations 0, 1, 2
    current = _state(tiny_model)
    path = save_adaptation_state(tmp_path / "s.safetensors", tiny_model, state, {}, running=True)
    gen.close()
    model, loaded, _ = load_adaptation_state(path, FAST.lr, device="cpu")
    assert loaded.step == 2 and _same(model.state_dict(), current)


def test_a_failed_iteration_leaves_nothing_to_resume_from(tmp_path, tiny_model, target):
    from napari_discreg.core.files.resume import save_adaptation_state
    from napari_discreg.core.learning.adapt import AdaptState

    state = AdaptState()
    gen = nd.adapt_steps(
        tiny_model, *target, steps=5, config=FAST, data_config=CFG, device="cpu", state=state
    )
    next(gen)
    with torch.no_grad():
        tiny_model.F1.net[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        list(gen)
    assert state.weights is None
    with pytest.raises(ValueError, match="half-updated"):
        save_adaptation_state(tmp_path / "x.safetensors", tiny_model, state, {}, running=False)


def test_resume_errors_are_clear(tmp_path, tiny_model, target):
    from napari_discreg.core.files.checkpoint import save_checkpoint
    from napari_discreg.core.files.resume import load_adaptation_state
    from napari_discreg.core.learning.adapt import AdaptState

    plain = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="no adaptation run"):
        load_adaptation_state(plain, 1e-3)
    with pytest.raises(ValueError, match="needs its best weights"):
        run(tiny_model, target, steps=4, state=AdaptState(step=2))
    with pytest.raises(ValueError, match="cannot continue"):
        run(tiny_model, target, steps=4, state=AdaptState(step=6))


def test_selection_scores_agree_with_each_criterion_and_see_head_disagreement(tiny_model):
    from napari_discreg.core.config import SELECTION_CRITERIA
    from napari_discreg.core.registration.predict import (
        prepare_target,
        selection_criterion,
        selection_scores,
    )

    cfg = DataConfig(size=48, max_displacement=2.0)
    template = data.load_template(cfg.size)
    pairs = [
        data.make_pair(template, 100 + i, "t1", "t2", np.random.default_rng(i), cfg)
        for i in range(2)
    ]
    f, m, mask = prepare_target(
        np.stack([p.fixed for p in pairs]),
        np.stack([p.moving for p in pairs]),
        tiny_model.config.stride,
        "cpu",
    )
    scores = selection_scores(tiny_model, f, m, mask)
    assert set(scores) == set(SELECTION_CRITERIA) and all(np.isfinite(list(scores.values())))
    for kind in SELECTION_CRITERIA:
        assert selection_criterion(tiny_model, f, m, mask, kind) == pytest.approx(scores[kind])
    assert scores["agreement"] < 0  # two differently initialised heads disagree somewhere
    twin = clone_model(tiny_model)
    twin.F2.load_state_dict(twin.F1.state_dict())
    assert selection_scores(twin, f, m, mask, ("agreement",))["agreement"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown selection criterion"):
        selection_scores(tiny_model, f, m, mask, ("bogus",))


def test_should_stop_inside_an_iteration_undoes_it_and_scores_the_last_complete_one(
    tiny_model, target
):
    """A stop asked for in the middle of iteration 3 (after its step A) ends the run
    within that pass: the model goes back to iteration 2's weights, which are scored by
    the keep-best criterion (keep_best=False: they are what the run keeps)."""
    cfg = AdaptConfig.mcd(batch_size=2, select_every=100, generator_updates=1, keep_best=False)
    state = AdaptState()
    calls = {"n": 0}
    completed: list[int] = []
    snapshots = {}

    def should_stop() -> bool:
        # iteration 3: checked before it (1st call), then after its step A (2nd call)
        if len(completed) == 3:
            calls["n"] += 1
        return calls["n"] >= 2

    gen = nd.adapt_steps(
        tiny_model,
        *target,
        steps=50,
        config=cfg,
        data_config=CFG,
        device="cpu",
        state=state,
        should_stop=should_stop,
    )
    for record in gen:
        completed.append(record.iteration)
        snapshots[record.iteration] = _state(tiny_model)
    assert completed == [0, 1, 2]  # iteration 3 never completed
    assert state.step == 2
    assert _same(snapshots[2], tiny_model.state_dict())  # undone: iteration 2's weights
    assert state.best_iteration == 2 and state.best_score is not None  # scored on stop


def test_should_stop_before_any_iteration_keeps_the_start(tiny_model, target):
    before = _state(tiny_model)
    records = run(tiny_model, target, steps=10, should_stop=lambda: True)
    assert [r.iteration for r in records] == [0]
    assert _same(before, tiny_model.state_dict())


@pytest.mark.parametrize("kind", ["swd", "pemd16+"])
def test_swd_projections_reach_every_discrepancy_with_an_swd_term(
    tiny_model, target, kind, monkeypatch
):
    """``AdaptConfig.swd_projections`` was ignored for pEMD (16+), whose SWD term then kept
    its default 128 projections."""
    import napari_discreg.core.learning.adapt as adapt_module

    seen: list[dict] = []
    original = adapt_module.discrepancy_fn

    def spy(which, **kwargs):
        seen.append(kwargs)
        return original(which, **kwargs)

    monkeypatch.setattr(adapt_module, "discrepancy_fn", spy)
    fixed, moving = target
    cfg = AdaptConfig.mcd(steps=1, batch_size=2, select_every=1, swd_projections=8)
    nd.adapt(tiny_model, fixed, moving, discrepancy=kind, config=cfg, device="cpu")
    assert seen and all(k.get("num_projections") == 8 for k in seen)
