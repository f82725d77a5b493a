"""register(progress=): a report after every optimiser step, and a stop through it."""

from __future__ import annotations

import numpy as np
import pytest

from napari_discreg import register
from napari_discreg.core.config import RefineConfig
from napari_discreg.core.registration.prealign import prealign_steps
from napari_discreg.core.registration.refine import refine_step_count


class _Stop(Exception):
    pass


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the tiny model's range


@pytest.mark.parametrize("method", ["bspline", "network", "network+adam", "network+bspline"])
def test_progress_counts_every_step_to_the_total(pair, tiny_model, method):
    seen: list[tuple[int, int]] = []
    result = register(
        pair.fixed,
        pair.moving,
        model=tiny_model,
        device="cpu",
        method=method,
        progress=lambda done, total: seen.append((done, total)),
    )
    totals = {t for _, t in seen}
    assert len(totals) == 1
    total = totals.pop()
    done = [d for d, _ in seen]
    assert done[0] == 0 and done[-1] == total  # starts at 0, ends at the total
    assert done == sorted(done)  # never goes back
    # the pre-alignment's Adam steps come first, then the method's optimiser steps
    assert result.prealign == "affine"
    assert total > 3 and len(set(done)) > 3  # many intermediate reports, not 0 -> 100 %
    if method == "network+adam":  # Adam steps of every level, plus the network
        expected = 1 + refine_step_count(RefineConfig(), pair.fixed.shape)
    else:  # Gauss-Newton steps (plus the network's pass)
        expected = result.refine_steps + (0 if method == "bspline" else 1)
    assert total == prealign_steps() + expected
    # the result is the same as without a progress callback
    plain = register(pair.fixed, pair.moving, model=tiny_model, device="cpu", method=method)
    np.testing.assert_allclose(result.displacement, plain.displacement, atol=1e-5)


def test_an_exception_from_progress_stops_the_registration_within_a_step(pair, tiny_model):
    calls = []

    def progress(done, total):
        calls.append(done)
        if done >= 2:
            raise _Stop

    with pytest.raises(_Stop):
        register(pair.fixed, pair.moving, model=tiny_model, device="cpu", progress=progress)
    assert calls == [0, 1, 2]  # no step after the one that asked to stop
