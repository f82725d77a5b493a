"""The ``napari-discreg`` command line (also ``python -m napari_discreg``).

Sub-commands::

    napari-discreg register FIXED MOVING -o OUTDIR [--model CKPT]
    napari-discreg train -o CKPT [--source PATH ...] [--steps N] [--size PX]
                         [--checkpoint-every N] [--resume STATE] ...
    napari-discreg adapt -o CKPT [--source PATH ...]
                         (--target PATH ... [--target-moving PATH] [--unpaired]
                          | --target-fixed PATH --target-moving PATH | --demo-target N)
    napari-discreg demo -o OUTDIR [--size 192] [--seed 0] [--model CKPT]

Conventions
-----------
* Errors a user causes (a missing or unreadable file, images of different shapes,
  a bad checkpoint, an output folder that cannot be written) print
  ``napari-discreg: error: <message>`` to stderr and exit with status 2, without a
  traceback (``--traceback`` shows it, for bug reports).
* Outputs are all-or-nothing: where they will go is checked before any computing,
  every file is written to a temporary name in the output folder, and the set of
  ``register`` or ``demo`` is swapped in as one transaction
  (:class:`~napari_discreg.core.files.transaction.OutputSet`): the folder holds the complete
  previous set or the complete new one, never a mix, whatever fails, signals or kills
  the run. A failed or interrupted run leaves nothing behind (not even the output
  folder, if it created it).
* Ctrl-C during ``train`` or ``adapt`` stops after the current iteration and saves
  what there is (and says so); the exit status is then 130. SIGTERM is handled like
  Ctrl-C. The message says what was written.
* A console that cannot be written (a full disk behind ``>``, a closed pipe) never
  changes what a run writes or its exit status.
* ``train`` and ``adapt`` run unchanged under ``torchrun --nproc-per-node N`` (data
  parallel, :mod:`napari_discreg.core.learning.distributed`): rank 0 prints, shows progress
  and writes the files; see docs/scaling.md. A rank that hangs longer than
  ``--dist-timeout`` (default 300 s) makes the others stop with an error, status 1.
* Outputs never replace inputs (refused, status 2); ``-o`` of ``train``/``adapt``
  must end in ``.safetensors``. Ctrl-C never replaces a model already at ``-o``: the
  partial one goes to ``NAME.partial.safetensors`` beside it. A full disk is an
  error naming the file and the bytes needed (status 2), the previous file intact.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed

from .. import __version__
from ..core.files.transaction import recording_commits, signal_handlers
from ..core.learning.distributed import DistributedError
from ..runs.base import SettingError
from ._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    PROG,
    _complain,
)
from .adapt import _add_adapt
from .demo import _add_demo
from .register import _add_register
from .train import _add_train

__all__ = ["main", "build_parser"]


# Sub-commands, in the order ``--help`` lists them. Each adder gets the sub-parsers
# object, adds its parser and sets ``func`` (args -> exit status). The benchmarks are
# scripts in benchmarks/, not part of the product.
_SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_register,
    _add_train,
    _add_adapt,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Learned discrete multimodal 2D registration (Heinrich & Hansen, MIDL 2020), "
            "adapted to new contrasts by maximum classifier discrepancy."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full traceback on errors (for bug reports)",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_FLAGS = {"source_contrasts": "--contrasts"}
"""Spec fields whose option is not their name with dashes."""


def _flag(field: str) -> str:
    """The option of a spec field: ``target_fixed`` -> ``--target-fixed``."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's :class:`KeyboardInterrupt` so that a run stops the
    same way: temporaries deleted, the partial model saved, the state kept."""


def _sigterm_as_interrupt():
    """While the block runs, SIGTERM raises :class:`Terminated` (main thread only: Python
    delivers signals there; elsewhere nothing changes)."""

    def terminate(signum, frame):
        raise Terminated

    if not hasattr(signal, "SIGTERM"):  # Windows
        return contextlib.nullcontext()
    return signal_handlers(terminate, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a failed run, 2 user error or
    full disk, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (status 2)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    args.command_line = shlex.join([PROG, *argv])
    with _sigterm_as_interrupt(), recording_commits() as written:
        return _run(args, written)


def _run(args, written) -> int:
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:
        if args.traceback:
            raise
        text = exc.naming(_flag) if isinstance(exc, SettingError) else str(exc)
        _complain(f"{PROG}: error: {text}")
        return EXIT_USER_ERROR
    except DistributedError as exc:
        if args.traceback:
            raise
        _complain(f"{PROG}: error: {exc}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # a group whose peer hangs cannot be torn down: gloo's threads stay blocked
            # and the interpreter's exit ends in std::terminate (SIGABRT); leave now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_FAILURE)
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        done = (
            f"the outputs were written to {', '.join(map(str, dict.fromkeys(written)))}"
            if written
            else "nothing was written"
        )
        _complain(f"{PROG}: {what}; {done}")
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
