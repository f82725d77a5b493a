"""Leaving :func:`adapt_steps` early (issue 26, item 15): ``break``, ``close()``, ``del``
and garbage collection all end a run alike (the best weights already scored, eval mode,
the current weights in the state), nothing is scored on the way out, the process never
aborts at exit, and one model takes one generator at a time."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import napari_discreg as nd
import napari_discreg.core.learning.adapt as adapt_mod
from napari_discreg.core.config import AdaptConfig, DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.learning.adapt import AdaptState
from napari_discreg.core.learning.model import clone_model

SIZE = 32
DATA = DataConfig(size=SIZE)
# iteration 3 is not scored (select_every 2): leaving there shows whether leaving scores
MCD = AdaptConfig.mcd(batch_size=2, select_every=2, generator_updates=1, lr=1e-2)


@pytest.fixture(scope="module")
def target():
    template = data.load_template(SIZE)
    pairs = data.fixed_test_pairs(
        template, DATA, n=3, fixed_contrast="t1", moving_contrast="t2", seed=0
    )
    return np.stack([p.fixed for p in pairs]), np.stack([p.moving for p in pairs])


def _weights(model_or_dict):
    sd = model_or_dict if isinstance(model_or_dict, dict) else model_or_dict.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _steps(model, target, state, **kw):
    return nd.adapt_steps(
        model, *target, steps=6, config=MCD, data_config=DATA, device="cpu", state=state, **kw
    )


ENDINGS = ("close", "del", "gc", "dropped loop", "contextlib.closing")


def _leave_at_3(model, target, how: str, scored: list[int]):
    """Run to iteration 3 and leave ``how``; returns (state, current weights at record 3,
    criterion evaluations before leaving)."""
    state = AdaptState()
    at_3: dict = {}

    def watch(record) -> bool:
        if record.iteration == 3:
            at_3.update(_weights(model), _calls=len(scored))
            return True
        return False

    if how == "dropped loop":
        for record in _steps(model, target, state):
            if watch(record):
                break
    elif how == "contextlib.closing":
        with contextlib.closing(_steps(model, target, state)) as steps:
            for record in steps:
                if watch(record):
                    break
    else:
        steps = _steps(model, target, state)
        for record in steps:
            if watch(record):
                break
        assert model.training  # a referenced generator has not ended (documented)
        if how == "close":
            steps.close()
        elif how == "del":
            del steps
        else:  # only the cyclic garbage collector can reach it
            cycle: list = [steps]
            cycle.append(cycle)
            del steps, cycle
            gc.collect()
    calls = at_3.pop("_calls")
    return state, at_3, calls


def test_every_way_of_leaving_ends_alike_and_scores_nothing(tiny_model, target, monkeypatch):
    scored: list[int] = []
    real = adapt_mod.selection_criterion

    def counting(*args, **kwargs):
        scored.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt_mod, "selection_criterion", counting)
    ends = {}
    for how in ENDINGS:
        model = clone_model(tiny_model)
        state, current, calls = _leave_at_3(model, target, how, scored)
        assert len(scored) == calls, f"{how}: leaving ran the selection criterion"
        assert not model.training, how
        assert state.step == 3 and state.best_iteration in (0, 2), how
        assert _same(_weights(model), state.best_weights), f"{how}: not the best weights"
        assert _same(state.weights, current), f"{how}: the state lost the current weights"
        assert all(p.requires_grad for p in model.parameters()), how
        assert model not in adapt_mod._ADAPTING, how
        ends[how] = (_weights(model), state.best_iteration, state.best_score)
    ref_weights, ref_iter, ref_score = ends["close"]
    for how, (weights, it, score) in ends.items():
        assert _same(weights, ref_weights) and (it, score) == (ref_iter, ref_score), how


def test_a_second_generator_on_one_model_is_refused(tiny_model, target):
    first = _steps(tiny_model, target, None)
    next(first), next(first)
    second = _steps(tiny_model, target, None)
    with pytest.raises(RuntimeError, match="already being adapted by another adapt_steps"):
        next(second)
    # another model may be adapted meanwhile
    other = _steps(clone_model(tiny_model), target, None)
    assert next(other).iteration == 0
    other.close()
    first.close()
    again = _steps(tiny_model, target, None)  # the first one ended: the model is free
    assert next(again).iteration == 0
    again.close()


def test_closing_a_resumed_run_at_its_first_record_installs_its_best_weights(tiny_model, target):
    state = AdaptState()
    steps = _steps(tiny_model, target, state)
    for record in steps:
        if record.iteration == 3:
            break
    steps.close()
    best, current = _weights(state.best_weights), _weights(state.weights)
    assert not _same(best, current)
    tiny_model.load_state_dict(current)  # a resume starts from the current weights
    tiny_model.train()
    resumed = _steps(tiny_model, target, state)
    assert next(resumed).iteration == 3
    resumed.close()
    assert _same(_weights(tiny_model), best) and not tiny_model.training
    assert _same(state.weights, current)


SCRIPT = """
import numpy as np, torch
import napari_discreg as nd
from napari_discreg.core.data import template as data
from napari_discreg.core.config import AdaptConfig, DataConfig, ModelConfig
from napari_discreg.core.learning.model import DiscreteRegistrationNet

torch.manual_seed(0)
tiny = ModelConfig(
    num_labels=5, capture_range=2.0, stride=4, features=4, head_channels=8, head_bottleneck=0
)
cfg = DataConfig(size=32)
pairs = data.fixed_test_pairs(
    data.load_template(32), cfg, n=3, fixed_contrast="t1", moving_contrast="t2", seed=0
)
f, m = np.stack([p.fixed for p in pairs]), np.stack([p.moving for p in pairs])
left = []
for config in (
    AdaptConfig.mcd(batch_size=2, select_every=2, generator_updates=1),
    AdaptConfig(batch_size=2, select_every=2, min_pseudo_gain=0.0),
):
    model = DiscreteRegistrationNet(tiny)
    steps = nd.adapt_steps(model, f, m, steps=6, config=config, data_config=cfg, device="cpu")
    for record in steps:
        if record.iteration == 3:
            break
    left.append(steps)  # left by break, still referenced at exit
    try:
        next(nd.adapt_steps(model, f, m, steps=6, config=config, device="cpu"))
    except RuntimeError as exc:
        print("refused:", exc)
print("exiting")
"""


def test_generators_left_by_break_do_not_abort_the_process_at_exit():
    """The process used to abort at exit (``INTERNAL ASSERT FAILED``, status 134): the
    generators' finaliser ran the selection criterion while the interpreter shut down."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("refused: this model is already being adapted") == 2
    assert done.stdout.strip().endswith("exiting") and "INTERNAL ASSERT" not in done.stderr


def test_stop_adaptation_thrown_in_scores_the_last_complete_iteration(
    tiny_model, target, monkeypatch
):
    """The explicit way to end with a last candidate (what Stop and Ctrl-C of a run do)."""
    scored: list[int] = []
    real = adapt_mod.selection_criterion
    monkeypatch.setattr(
        adapt_mod, "selection_criterion", lambda *a, **k: scored.append(1) or real(*a, **k)
    )
    keep_last = AdaptConfig.mcd(batch_size=2, select_every=2, generator_updates=1, keep_best=False)
    state = AdaptState()
    steps = nd.adapt_steps(
        tiny_model,
        *target,
        steps=6,
        config=keep_last,
        data_config=DATA,
        device="cpu",
        state=state,
    )
    for record in steps:
        if record.iteration == 3:
            current, calls = _weights(tiny_model), len(scored)
            break
    with pytest.raises(StopIteration):
        steps.throw(adapt_mod.StopAdaptation())
    assert len(scored) == calls + 1 and state.best_iteration == 3
    assert _same(_weights(tiny_model), current) and not tiny_model.training
    assert _same(state.weights, current)
