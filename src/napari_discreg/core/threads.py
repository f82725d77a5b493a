"""How many threads torch computes with, chosen for the machine's load.

A torch job that uses a thread per core beside other busy processes waits at every
OpenMP barrier for whichever of its threads the system has just descheduled:
``register()`` of a 192 px pair took 12.8 s beside two busy processes with torch's
default 2 threads on a 2-core machine, and 2.39 s with one thread, where both take
0.74 s on a quiet machine (``python benchmarks/busy_machine.py``, docs/benchmarks.md).

:func:`use_threads_for_load` sets the calling thread's torch thread count before a job
(the application layer calls it: the registration and adaptation runs): with the
setting ``"auto"`` (the default) it is torch's own count, lowered to the cores that
other work leaves free now (at least one); ``"torch"`` leaves torch's count as it is,
and a number sets that many. The setting comes from the argument, else the
environment variable :data:`ENV_THREADS`.

The count changes float rounding in parallel sums, so runs that must repeat bit for bit
(a resumed adaptation beside its uninterrupted twin) need a fixed setting, such as a
number.
"""

from __future__ import annotations

import os

import torch

from .config import ENV_PREFIX

ENV_THREADS = ENV_PREFIX + "THREADS"
"""Environment variable: ``auto`` (default), ``torch`` or a number of threads."""

_TORCH_DEFAULT: list[int] = []  # torch's own count, read before this module changes it


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def busy_elsewhere() -> int | None:
    """Threads of other work that are running or ready to run now: the first number of
    the fourth field of ``/proc/loadavg`` (runnable scheduling entities, this one
    included) minus one; ``None`` where that file does not exist."""
    try:
        with open("/proc/loadavg") as fh:
            fields = fh.read().split()
        runnable = int(fields[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, runnable - 1)


def threads_for_load(setting: str | int | None = None) -> int | None:
    """The thread count for a job now (``None``: leave torch's as it is); see the
    module docstring. ``ValueError`` for a setting that is none of the three."""
    if not _TORCH_DEFAULT:
        _TORCH_DEFAULT.append(torch.get_num_threads())
    raw = os.environ.get(ENV_THREADS, "auto") if setting is None else setting
    text = str(raw).strip().lower()
    if text == "torch":
        return None
    if text != "auto":
        try:
            number = int(text)
        except ValueError:
            number = 0
        if not 1 <= number <= 4096:
            raise ValueError(
                f"threads: {raw!r} is not 'auto', 'torch' or a number of threads (1 to 4096)"
            )
        return number
    own = min(_TORCH_DEFAULT[0], _cores())
    busy = busy_elsewhere()
    if busy is None:
        return own
    return max(1, min(own, _cores() - busy))


def use_threads_for_load(setting: str | int | None = None) -> int:
    """Set the calling thread's torch thread count by :func:`threads_for_load`; returns
    the count in use."""
    n = threads_for_load(setting)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
