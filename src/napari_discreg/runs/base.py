"""What training and adaptation runs share: the :class:`Run` generator, messages,
models named by path or shipped name, folders of the user's images, JSON values and
output folders."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from ..core.config import DataConfig, FolderConfig
from ..core.data.folders import SliceDataset
from ..core.files.checkpoint import checkpoint_path, load_model
from ..core.learning.distributed import DistContext
from ..core.learning.model import DiscreteRegistrationNet, clone_model, resolve_device

PathLike = str | os.PathLike
Say = Callable[[str], None]
"""A message sink: ``say(text)`` (e.g. ``print``)."""
ModelSource = PathLike | DiscreteRegistrationNet | None
"""A checkpoint file, a shipped model's name, an in-memory model, or ``None`` (the
default shipped model)."""

P = TypeVar("P")
R = TypeVar("R")


class Run(Generator[P, None, R], Generic[P, R]):
    """A run in progress: a generator of progress records that returns the run's result.

    Iterate it (or ``yield from`` it) for the records; when it ends its return value
    (``StopIteration.value``) is also kept in :attr:`result`. :meth:`close` stops it
    after the iteration in progress, like a Ctrl-C: the run then finishes its
    bookkeeping (best weights restored, state saved when asked) and, unlike a plain
    generator's ``close()`` before Python 3.13, returns the result.

    ``start_step`` is the iteration the run starts from (0, or a resumed run's),
    ``total`` its iterations in all, ``spec`` the resolved spec it runs and
    ``context`` its process context.
    """

    def __init__(
        self,
        body: Generator[P, None, R],
        *,
        start_step: int,
        total: int,
        spec: Any,
        context: DistContext,
    ) -> None:
        self._body = body
        self._over = False
        self.start_step = start_step
        self.total = total
        self.spec = spec
        self.context = context
        self.result: R | None = None

    def send(self, value: None) -> P:
        return self._step(self._body.send, value)

    def throw(self, typ, val=None, tb=None) -> P:  # type: ignore[override]
        if val is None and tb is None:
            return self._step(self._body.throw, typ)
        return self._step(self._body.throw, typ, val, tb)

    def _step(self, call, *args) -> P:
        if self._over:
            raise StopIteration(self.result)
        try:
            return call(*args)
        except StopIteration as stop:
            self._over, self.result = True, stop.value
            raise
        except BaseException:
            self._over = True  # an exception that leaves a generator ends it
            raise

    def close(self) -> R | None:  # type: ignore[override]
        """Stop after the iteration in progress; returns the result (``None`` when the
        run was closed before its first record)."""
        if self._over:
            return self.result
        self._over = True
        try:
            self._body.throw(GeneratorExit)  # what close() does, but keeps the value
        except StopIteration as stop:
            self.result = stop.value
        except GeneratorExit:
            pass  # not started yet, or it let the exit through: no result
        else:
            self._body.close()
            raise RuntimeError("the run went on after close()")
        return self.result


@dataclass(frozen=True)
class RunOptions:
    """What a training and an adaptation run take alike (see their specs for the
    meaning of each field): the labelled source, how folders are read, the process
    context, resumable states, the command line to record, where messages go, the
    memory limit of the run's estimates (``max_memory_gb``; default
    ``$NAPARI_DISCREG_MAX_MEMORY_GB``, else 8, never more than is available) and torch's
    thread count (``threads``, :func:`~napari_discreg.core.threads.use_threads_for_load`)."""

    data_config: DataConfig = field(default_factory=DataConfig)
    folder_config: FolderConfig = field(default_factory=FolderConfig)
    source: PathLike | Sequence[PathLike] | None = None
    skip_bad: bool = False
    allow_mixed_shapes: bool = False
    workers: int = 0
    device: str | None = None
    context: DistContext | None = None
    checkpoint_every: int | None = None
    state_path: PathLike | None = None
    resume: PathLike | None = None
    command: str | None = None
    log: Say | None = None
    warn: Say | None = None
    max_memory_gb: float | None = None
    threads: str | int | None = None


@dataclass(frozen=True)
class Messages:
    """Where a run's messages go; only the main process (rank 0) says anything."""

    log: Say | None = None
    warn: Say | None = None
    main: bool = True

    def info(self, text: str) -> None:
        if self.main and self.log is not None:
            self.log(text)

    def warning(self, text: str) -> None:
        if self.main and self.warn is not None:
            self.warn(text)


def context_for(context: DistContext | None, device) -> DistContext:
    """``context``, or a single-process one on ``device`` (``None``/"auto": CUDA when
    available, else CPU)."""
    return context if context is not None else DistContext(device=resolve_device(device))


def state_file(checkpoint_every: int | None, state_path, resume) -> Path | None:
    """The state file a run keeps: ``state_path`` (default: the resumed file) when it
    saves states (``checkpoint_every``) or continues one (``resume``), else ``None``."""
    if not (checkpoint_every or resume):
        return None
    if state_path is None and not resume:
        raise ValueError("checkpoint_every needs a state_path to write the state to")
    chosen = state_path if state_path is not None else resume
    assert chosen is not None
    return Path(chosen)


class SettingError(ValueError):
    """A :class:`ValueError` about a run's settings, which names each setting by its
    spec field in braces (``"{target_fixed}"``). ``str()`` shows the field names (the
    Python API's words); a front end puts in its own with :meth:`naming` (the command
    line its flags, ``--target-fixed``), so that no message of the runs names a flag."""

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.naming(lambda field: field))

    def naming(self, name: Callable[[str], str]) -> str:
        """The message with each ``{field}`` replaced by ``name(field)``."""
        return re.sub(r"\{([a-z_]+)\}", lambda m: name(m.group(1)), self.template)


def contradiction(setting: str, resume: object, saved: object) -> SettingError:
    """The error of a resumed run (training or adaptation) given ``setting`` other than
    the saved run's ``saved`` value: a resume continues the saved run as it was."""
    return SettingError(
        f"{{{setting}}} differs from the run saved in {resume} ({saved!r}); leave it out "
        "when resuming"
    )


def load_base_model(source: ModelSource, device) -> tuple[DiscreteRegistrationNet, str]:
    """(model, description) of a checkpoint file, a shipped model's name, ``None`` (the
    default shipped model) or an in-memory model (copied, so the original stays as it
    is), on ``device``."""
    if isinstance(source, DiscreteRegistrationNet):
        return clone_model(source).to(resolve_device(device)), "in-memory model"
    file = checkpoint_path(source)
    if file != Path(source or ""):  # a shipped model
        if not file.is_file():
            raise SettingError(
                f"the pretrained model shipped with napari-discreg is missing ({file}); "
                "train one (napari-discreg train -o model.safetensors) and pass it as {model}"
            )
        return load_model(file, device), f"{file} (shipped)"
    assert source is not None  # None names the default shipped model
    return load_model(source, device), str(Path(source))


def report_bad(bad, say: Messages) -> None:
    """A warning for each file that was left out."""
    for b in bad:
        say.warning(f"skipped {b}")


def load_folder(
    paths,
    *,
    name: str,
    size: int,
    folder_config: FolderConfig,
    skip_bad: bool,
    allow_mixed_shapes: bool,
    say: Messages,
) -> SliceDataset:
    """A SliceDataset of ``paths``; bad files skipped (with a warning) with ``skip_bad``."""
    ds = SliceDataset.from_paths(
        paths,
        size=size,
        config=folder_config,
        skip_bad=skip_bad,
        allow_mixed_shapes=allow_mixed_shapes,
        name=name,
    )
    report_bad(ds.bad, say)
    say.info(ds.describe())
    return ds


def path_list(paths: PathLike | Sequence[PathLike] | None) -> list[str] | None:
    """Paths as a list of strings (as the command line gives them); ``None`` stays."""
    if paths is None:
        return None
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value
