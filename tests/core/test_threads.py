"""torch's thread count for a run, chosen for the machine's load (issue 25, item 4)."""

from __future__ import annotations

import threading

import pytest
import torch

from napari_discreg.core import threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", [2])


@pytest.mark.parametrize(("busy", "expected"), [(0, 2), (1, 1), (4, 1), (None, 2)])
def test_auto_leaves_the_cores_that_other_work_takes(monkeypatch, two_cores, busy, expected):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: busy)
    assert threads.threads_for_load("auto") == expected


def test_settings_and_environment(monkeypatch, two_cores):
    assert threads.threads_for_load("torch") is None
    assert threads.threads_for_load(3) == 3
    monkeypatch.setenv(threads.ENV_THREADS, " 1 ")
    assert threads.threads_for_load() == 1
    for bad in ("many", 0, "-2", "1e9"):
        with pytest.raises(ValueError, match="'auto', 'torch' or a number"):
            threads.threads_for_load(bad)


def test_the_count_is_set_in_the_thread_that_runs_the_job():
    seen = []

    def job():
        before = torch.get_num_threads()
        seen.append(threads.use_threads_for_load(1))
        seen.append(torch.get_num_threads())
        torch.set_num_threads(before)  # new threads start with the last count set

    t = threading.Thread(target=job)
    t.start()
    t.join()
    assert seen == [1, 1]


def test_a_registration_run_refuses_a_bad_setting_before_it_runs():
    import numpy as np

    from napari_discreg.runs.registration import RegistrationSpec, run_registration

    image = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError, match="not 'auto'"):
        run_registration(RegistrationSpec(image, image, threads="lots"))


def test_busy_elsewhere_reads_the_runnable_count():
    busy = threads.busy_elsewhere()
    assert busy is None or busy >= 0
