"""The registration room: a spec in, one record per slice, a stack result; the command
line and the API reach the same function."""

from __future__ import annotations

import numpy as np
import pytest

import napari_discreg as nd
from napari_discreg.runs.registration import (
    RegistrationSpec,
    SliceRegistered,
    run_registration,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the tiny model's range


def test_a_pair_gives_one_record_and_the_api_s_result(pair, tiny_model):
    steps = []
    spec = RegistrationSpec(
        pair.fixed, pair.moving, model=tiny_model, on_step=lambda *a: steps.append(a)
    )
    run = run_registration(spec)
    records = list(run)
    assert [type(r) for r in records] == [SliceRegistered]
    assert records[0].index is None and (records[0].number, records[0].total) == (1, 1)
    direct = nd.register(pair.fixed, pair.moving, model=tiny_model)
    np.testing.assert_array_equal(run.result.first.displacement, direct.displacement)
    assert steps and steps[-1][1] == steps[-1][2]  # the last step report says "done"
    summary = run.result.summary()
    assert summary["slices"] == 1 and summary["method"] == nd.DEFAULT_METHOD


def test_a_stack_registers_the_chosen_slices_and_stops_between_them(pair, tiny_model):
    fixed = np.stack([pair.fixed] * 4)
    moving = np.stack([pair.moving] * 4)
    spec = RegistrationSpec(fixed, moving, axis=0, indices=(1, 3), model=tiny_model)
    run = run_registration(spec)
    assert [r.index for r in run] == [1, 3]
    assert set(run.result.results) == {1, 3}
    run = run_registration(RegistrationSpec(fixed, moving, axis=0, model=tiny_model))
    first = next(run)
    stack = run.close()
    assert first.index == 0 and list(stack.results) == [0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"axis": 0, "indices": (7,)}, "out of range"),
        ({"axis": 3}, "does not exist"),
        ({"indices": (1,)}, "give axis"),
    ],
)
def test_bad_slices_are_refused_before_anything_runs(pair, tiny_model, kwargs, match):
    stack = np.stack([pair.fixed] * 2)
    with pytest.raises(ValueError, match=match):
        run_registration(RegistrationSpec(stack, stack, model=tiny_model, **kwargs))
    with pytest.raises(ValueError, match="as many"):
        run_registration(RegistrationSpec(stack, stack[:1], axis=0, model=tiny_model))
