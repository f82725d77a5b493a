"""What the sub-commands share: exit codes, argument types, the checks that outputs
never replace inputs, saved models, progress bars and the options for the user's own
image folders.

Files written together (:class:`~napari_discreg.core.files.transaction.OutputSet`) and the
writability checks live in :mod:`napari_discreg.core.files.transaction`; loading a model
(:func:`napari_discreg.runs.base.load_base_model`) and ``jsonable`` in
:mod:`napari_discreg.runs.base`."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .. import save_model
from ..core.config import SHIPPED_MODELS, FolderConfig
from ..core.files import imagefiles
from ..core.files.transaction import (
    check_writable_file,
    make_dirs,
    remove_empty,
    write_text,
)
from ..core.learning.distributed import (
    TIMEOUT_ENV,
    DistContext,
    barrier,
    collective_failure,
    shutdown,
)
from ..core.registration.methods import method_named
from ..runs.base import jsonable as _jsonable

SHIPPED_NAMES = ", ".join(SHIPPED_MODELS)
"""The shipped models ``--model`` accepts by name (for help texts)."""

PROG = "napari-discreg"
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_memory_option(p) -> None:
    """``--max-memory-gb``: the most memory one job may need by core.memory's estimate
    (the spec's ``max_memory_gb``; the available memory bounds it too)."""
    from ..core.memory import DEFAULT_LIMIT_GB, ENV_LIMIT

    p.add_argument(
        "--max-memory-gb",
        type=_positive_float,
        default=None,
        metavar="GB",
        help=f"refuse a job whose estimated peak memory exceeds GB (default: ${ENV_LIMIT}, "
        f"else {DEFAULT_LIMIT_GB:g}; never more than the memory available)",
    )


def _print(message: str, stream) -> None:
    """Print, ignoring a console that cannot be written (``>/dev/full``, a closed pipe):
    what a run writes and its exit status never depend on the console."""
    try:
        print(message, file=stream, flush=True)
    except (OSError, ValueError):  # ValueError: the stream was closed
        pass


def _say(message: str = "") -> None:
    _print(message, sys.stdout)


def _warn(message: str) -> None:
    _print(f"{PROG}: warning: {message}", sys.stderr)


def _complain(message: str) -> None:
    """An error line on stderr (ignored where stderr cannot be written)."""
    _print(message, sys.stderr)


class _Console:
    """A stream for progress bars that drops what cannot be written."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def isatty(self) -> bool:
        try:
            return bool(self._stream.isatty())
        except (OSError, ValueError, AttributeError):
            return False


def _device_arg(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value.strip().lower()):
        raise argparse.ArgumentTypeError(f"invalid device {value!r}: use auto, cpu or cuda")
    return value.strip().lower()


def _number(convert, ok, requirement: str, what: str):
    """An argparse ``type``: ``convert`` the text (else "not {what}"), then check ``ok``."""

    def parse(value: str):
        try:
            x = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return x

    return parse


_positive_int = _number(int, lambda n: n >= 1, ">= 1", "an integer")
_non_negative_int = _number(int, lambda n: n >= 0, ">= 0", "an integer")
_positive_float = _number(
    float, lambda x: math.isfinite(x) and x > 0, "a positive number", "a number"
)
_fraction = _number(float, lambda x: 0.0 <= x < 1.0, "in [0, 1)", "a number")


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).absolute() == Path(b).absolute()


def refuse_overwriting_inputs(outputs: list[tuple[str, Path]], inputs: dict[str, object]) -> None:
    """Raise :class:`ValueError` if an output file is one of the inputs.

    ``outputs``: (description, e.g. ``"-o"``, file that will be written) pairs;
    ``inputs`` an option (``"--model"``) to its value(s) (paths; ``None`` skipped).
    """
    for opt, values in inputs.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is None or not isinstance(value, (str, os.PathLike)):
                continue
            for what, out in outputs:
                if Path(value).is_file() and _same_file(value, out):
                    raise ValueError(
                        f"{what} {out} would overwrite the input {opt} {value}; write the "
                        "output elsewhere"
                    )


MODEL_SUFFIX = ".safetensors"


def check_model_output(out: Path, inputs: dict[str, object], *, resume=None) -> Path:
    """``-o`` of ``train``/``adapt``: a ``.safetensors`` name that is no input (the state
    written beside it neither, except the ``--resume`` state it continues, and the
    ``NAME.partial.safetensors`` an interrupted run writes neither)."""
    check_writable_file(out)
    if not out.name.lower().endswith(MODEL_SUFFIX) or out.name.lower() == MODEL_SUFFIX:
        raise ValueError(
            f"-o {out}: a model is written as a {MODEL_SUFFIX} file; give a name ending in "
            f"{MODEL_SUFFIX} (e.g. model{MODEL_SUFFIX})"
        )
    refuse_overwriting_inputs([("-o", out)], {**inputs, "--resume": resume})
    refuse_overwriting_inputs([("the state written beside it,", _state_path(out))], inputs)
    # an interrupted run writes the model trained so far there (when -o exists already)
    refuse_overwriting_inputs(
        [("the model an interrupted run writes beside it,", partial_model_path(out))],
        {**inputs, "--resume": resume},
    )
    return out


def partial_model_path(out: Path) -> Path:
    """Where an interrupted run saves its model when ``out`` already holds one:
    ``model.safetensors`` -> ``model.partial.safetensors``."""
    name = out.name
    stem = name[: -len(MODEL_SUFFIX)] if name.lower().endswith(MODEL_SUFFIX) else name
    return out.with_name(stem + ".partial" + MODEL_SUFFIX)


def _save_model(model, path: Path, extra: dict) -> None:
    """Save a checkpoint atomically, creating its folder; nothing is left on failure
    (the previous file at ``path`` is kept)."""
    created = make_dirs(path.parent)
    try:
        save_model(model, path, extra=_jsonable(extra))
    except BaseException:
        remove_empty(created)
        raise


def save_run_model(model, out: Path, extra: dict, *, interrupted: bool, ctx) -> Path | None:
    """Rank 0 saves the run's model, every rank waits for it; returns where it went.

    An interrupted run never replaces a model already at ``out``: it goes to
    :func:`partial_model_path` instead. A failed save (e.g. a full disk) is raised on
    rank 0 after the other ranks were released, so that they do not wait for it.
    """
    dest, error = None, None
    if ctx.is_main:
        dest = partial_model_path(out) if interrupted and out.exists() else out
        try:
            _save_model(model, dest, extra)
        except OSError as exc:
            error = exc
    if not interrupted:
        barrier(ctx)
    if error is not None:
        raise error
    return dest


def _progress(total: int, desc: str, *, initial: int = 0, disable: bool = False):
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        unit="it",
        dynamic_ncols=True,
        file=_Console(sys.stderr),
        disable=disable,
    )


def _add_folder_options(p, *, axis: bool) -> None:
    """Options shared by ``train`` and ``adapt`` for the user's own image folders."""
    f = FolderConfig()
    g = p.add_argument_group(
        "your own images (folders, files or lists of 2D images and 3D volumes: "
        f"{' '.join(imagefiles.IMAGE_EXTENSIONS)})"
    )
    if axis:
        g.add_argument(
            "--axis",
            type=int,
            help="axis to slice 3D volumes along (default 0 for TIFF/.npy, 2 for NIfTI)",
        )
    g.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out files that cannot be used (each named in a warning) and go on with "
        "the good ones; without it any bad file stops the run with a message naming it",
    )
    g.add_argument(
        "--allow-mixed-shapes",
        action="store_true",
        help="accept files of different shapes (each is fitted into --size on its own)",
    )
    g.add_argument(
        "--min-foreground",
        type=_fraction,
        default=f.min_foreground,
        help="keep slices whose foreground area is at least this share of the largest "
        f"slice's in the same file (default {f.min_foreground})",
    )
    g.add_argument(
        "--val-fraction",
        type=_fraction,
        default=f.val_fraction,
        help="share of the files held out for the evaluation at the end; 0: no evaluation "
        f"(default {f.val_fraction})",
    )
    g.add_argument(
        "--eval-pairs",
        type=_non_negative_int,
        default=f.eval_pairs,
        help=f"held-out synthetic pairs in that evaluation (default {f.eval_pairs})",
    )
    g.add_argument(
        "--workers",
        type=_non_negative_int,
        default=0,
        help="background processes that make the training pairs (default 0: none)",
    )


def _add_dist_timeout(p) -> None:
    p.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others at a synchronisation "
        f"before it stops with an error (default ${TIMEOUT_ENV}, else 300)",
    )


def run_distributed(ctx: DistContext, work) -> int:
    """``work()`` in the process group ``ctx``; a failed collective (a hung or lost rank)
    becomes a :class:`~napari_discreg.core.learning.distributed.DistributedError` with a clear
    message; the group is left at the end."""
    try:
        result = work()
    except RuntimeError as exc:
        failure = collective_failure(exc, ctx)
        if failure is exc:
            shutdown(ctx)
            raise
        raise failure from exc  # the group is left as it is: a hung peer blocks its teardown
    shutdown(ctx)
    return result


def _state_path(out: Path) -> Path:
    """Where ``--checkpoint-every`` writes the training state next to ``-o OUT``."""
    name = out.name
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    return out.with_name(stem + ".state.safetensors")


def _evaluation_text(evaluation: dict | None) -> str:
    if not evaluation:
        return ""
    ident, mod = evaluation["identity"], evaluation["model"]
    return (
        f"held-out evaluation ({evaluation['pairs']} pairs): label accuracy "
        f"{ident['label_accuracy']:.1%} -> {mod['label_accuracy']:.1%}, EPE "
        f"{ident['epe']:.3f} -> {mod['epe']:.3f} px, folding {mod['folding']:.3%}"
    )


def check_refine_flag(method: str | None, steps: int | None) -> None:
    """``--refine STEPS`` (Adam steps per level) only with a method that takes them."""
    if steps is not None and method is not None and method_named(method).optimiser != "adam":
        raise ValueError(f"--refine STEPS applies to --method network+adam, not {method}")
