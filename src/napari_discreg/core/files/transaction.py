"""Several files written as one: all of them or none.

A registration writes a set of files (the warped image, the field, the affine, the
discrepancy map, a summary). :class:`OutputSet` makes the set one transaction:

1. every output is written to a hidden temporary beside its final name
   (:func:`napari_discreg.core.files.atomic.temporary_sibling`), while the run can still fail;
2. the swap, under an exclusive lock on the folder and with SIGINT and SIGTERM held
   back until it is over, records a journal, keeps each previous file under a hidden
   backup name (a hard link: the final name is never missing), renames the
   temporaries onto their names, and deletes the journal (the commit point) and the
   backups;
3. a failure inside the swap (a full disk, a name that turned into a folder) rolls
   back what was swapped, so the folder holds the complete previous set.

A process killed with SIGKILL in the milliseconds of the swap leaves its journal; the
next :class:`OutputSet` on that folder (or :func:`recover_interrupted_swaps`) rolls it
back before it writes anything, so a later reader never sees a mixed set.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import atomic

__all__ = [
    "OutputSet",
    "check_writable_dir",
    "check_writable_file",
    "folder_lock",
    "make_dirs",
    "recover_interrupted_swaps",
    "signal_handlers",
    "recording_commits",
    "remove_empty",
    "write_text",
]

_JOURNAL_PREFIX = ".napari-discreg-swap-"
_BACKUP = ".previous-"
_STALE_BACKUP = re.compile(rf"^\..*{re.escape(_BACKUP)}{re.escape(atomic.HOST)}-(\d+)-[^/]*$")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` and flush it to the disk."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Raise :class:`OSError` unless ``folder`` exists and is writable or can be created.

    Creates nothing: run it before any long computation.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise OSError(f"the output folder {folder} exists and is not a folder")
        probe = folder
    else:
        probe = _existing_ancestor(folder)
        if not probe.is_dir():
            raise OSError(
                f"cannot create the output folder {folder}: {probe} is a file, not a folder"
            )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OSError(f"cannot write to {probe}: permission denied")
    return folder


def check_writable_file(path: str | os.PathLike) -> Path:
    """Raise :class:`OSError` unless the file ``path`` could be (over)written."""
    path = Path(path)
    if path.is_dir():
        raise OSError(
            f"{path} is a folder; give a file name for the output (e.g. model.safetensors)"
        )
    check_writable_dir(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise OSError(f"cannot overwrite {path}: permission denied")
    return path


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` between processes (``flock`` on the folder itself;
    on Windows a byte lock on a ``.napari-discreg.lock`` file in it). Released when the
    block ends or the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None  # type: ignore[assignment]
    if fcntl is not None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
        return
    import msvcrt  # pragma: no cover

    fd = os.open(folder / ".napari-discreg.lock", os.O_RDWR | os.O_CREAT)  # pragma: no cover
    try:  # pragma: no cover
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined]
                break
            except OSError:
                continue
        yield
    finally:  # pragma: no cover
        os.close(fd)


_HELD = tuple(dict.fromkeys((signal.SIGINT, getattr(signal, "SIGTERM", signal.SIGINT))))


@contextmanager
def signal_handlers(handler, *signals: int) -> Iterator[bool]:
    """``handler`` for ``signals`` while the block runs, the previous handlers after it.

    Python sets handlers, and runs them, in the main thread only: elsewhere the block runs
    with the handlers as they are (it gets ``False``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    before = {s: signal.signal(s, handler) for s in signals}
    try:
        yield True
    finally:
        for s, previous in before.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is over, then take their usual course.

    Python runs signal handlers in the main thread whichever thread the signal hit, so
    the handlers are swapped for one that only notes the signal (a thread's signal mask
    would not do: the OpenMP threads of torch can receive it). Outside the main thread,
    where handlers cannot be set, a no-op.
    """
    pending: list[int] = []
    with signal_handlers(lambda signum, frame: pending.append(signum), *_HELD):
        yield
    for s in dict.fromkeys(pending):  # the previous handlers are back
        signal.raise_signal(s)


_COMMITS: list[list[Path]] = []


@contextmanager
def recording_commits() -> Iterator[list[Path]]:
    """Collect the folders whose :class:`OutputSet` was swapped in while the block runs
    (the command line uses it to tell the truth when it is interrupted afterwards)."""
    folders: list[Path] = []
    _COMMITS.append(folders)
    try:
        yield folders
    finally:
        _COMMITS.remove(folders)


def _backup_name(final: Path) -> Path:
    """A fresh hidden name beside ``final`` for its previous content."""
    tmp = atomic.temporary_sibling(final)  # unique, exclusive; renamed right away
    backup = tmp.with_name(_BACKUP.join(tmp.name.rsplit(".partial-", 1)))
    os.replace(tmp, backup)
    return backup


def _keep_previous(final: Path, backup: Path) -> None:
    """Keep ``final``'s current content at ``backup`` (a hard link, so that ``final``
    never goes missing; a rename where links are not supported)."""
    os.unlink(backup)  # the placeholder that reserved the name
    try:
        os.link(final, backup, follow_symlinks=False)
    except OSError:  # no hard links here (FAT, some network shares)
        os.replace(final, backup)


def _write_journal(folder: Path, entries: list[dict]) -> Path:
    name = f"{_JOURNAL_PREFIX}{atomic.HOST}-{os.getpid()}-{secrets.token_hex(4)}.json"
    text = json.dumps({"pid": os.getpid(), "entries": entries})
    return atomic.replace_atomically(folder / name, lambda tmp: write_text(tmp, text))


def _roll_back(entries: list[dict]) -> None:
    """Undo a swap, in this process or from a dead one's journal: where the temporary
    was renamed onto the final name (the final file is the temporary's inode), the
    previous file comes back or the new one goes; elsewhere a backup is dropped (a hard
    link of the unchanged final) or renamed back. Best effort, each entry on its own."""
    for entry in reversed(entries):
        final, tmp = Path(entry["final"]), Path(entry["tmp"])
        backup = Path(entry["backup"]) if entry.get("backup") else None
        try:
            st = os.stat(final, follow_symlinks=False) if os.path.lexists(final) else None
            swapped = (
                st is not None and entry.get("inode") == st.st_ino and not os.path.lexists(tmp)
            )
            if swapped:
                if backup is not None and backup.exists():
                    os.replace(backup, final)
                else:
                    final.unlink()
            elif backup is not None and backup.exists():
                if st is None:  # the final was renamed to the backup: it comes back
                    os.replace(backup, final)
                else:  # the final is unchanged; the backup is a link of it or a placeholder
                    backup.unlink()
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def recover_interrupted_swaps(folder: str | os.PathLike) -> int:
    """Roll back the swaps in ``folder`` of processes of this machine that were killed
    before their commit (their journal is still there), and drop the backups such a
    process left after its commit; call it under :func:`folder_lock`. Returns how
    many swaps were rolled back."""
    folder = Path(folder)
    try:
        names = [e.name for e in os.scandir(folder)]
    except OSError:
        return 0
    recovered, pending = 0, set()
    for name in names:
        if not name.startswith(_JOURNAL_PREFIX):
            continue
        journal = folder / name
        try:
            record = json.loads(journal.read_text(encoding="utf-8"))
            pid, entries = int(record["pid"]), list(record["entries"])
        except (OSError, ValueError, KeyError, TypeError):
            # unreadable: leave it and keep its process's backups (they may be all there is)
            named = re.search(r"-(\d+)-[0-9a-f]+\.json$", name)
            if named is not None:
                pending.add(int(named.group(1)))
            continue
        if pid == os.getpid() or atomic.pid_alive(pid):
            pending.add(pid)
            continue
        _roll_back(entries)
        journal.unlink(missing_ok=True)
        recovered += 1
    for name in names:  # backups of a process killed between its commit and the cleanup
        m = _STALE_BACKUP.match(name)
        if m is None or int(m.group(1)) in pending or atomic.pid_alive(int(m.group(1))):
            continue
        (folder / name).unlink(missing_ok=True)
    if recovered:
        atomic.sync_folder(folder)
    return recovered


class OutputSet:
    """Files written together or not at all.

    ``OutputSet(folder, names)`` checks at once that ``folder`` can be written and that
    no folder stands where one of the ``names`` goes (creating nothing). Inside ``with outputs:`` the folder is created, :meth:`path` hands out a
    temporary name in it for each output, and on a clean exit the set is swapped in as
    one transaction (see the module's docstring): two runs writing into one folder at
    once leave the complete set of one of them, and a failure or a signal never leaves
    a mix. On an exception (or Ctrl-C) before the swap the temporaries are deleted, and
    so is any folder the block created; :attr:`committed` tells whether the set was
    swapped in.
    """

    def __init__(self, folder: str | os.PathLike, names: Iterable[str] = ()) -> None:
        self.folder = check_writable_dir(folder)
        for name in names:  # a folder in the way is an error now, not after the run
            self.final(name)
        self.committed = False
        self._staged: list[tuple[Path, Path]] = []
        self._created: list[Path] = []

    def final(self, name: str) -> Path:
        """Where output ``name`` ends up; :class:`OSError` if a folder is in the way."""
        final = self.folder / name
        if final.is_dir():
            raise OSError(f"cannot write {final}: it is a folder; move it away or write elsewhere")
        return final

    def __enter__(self) -> OutputSet:
        self._created = make_dirs(self.folder)
        with folder_lock(self.folder):
            recover_interrupted_swaps(self.folder)
        return self

    def path(self, name: str) -> Path:
        """Where to write output ``name`` (a temporary file until the block ends)."""
        final = self.final(name)
        tmp = atomic.temporary_sibling(final)
        self._staged.append((tmp, final))
        return tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                # a signal arriving now is raised when the block ends, after the commit
                with folder_lock(self.folder), _signals_held():
                    self._swap()
                    self.committed = True
                    for folders in _COMMITS:
                        folders.append(self.folder)
            except OSError as err:
                self._discard()
                raise OSError(
                    f"cannot write the outputs in {self.folder} ({err}); nothing was "
                    "written, the previous files are unchanged"
                ) from err
            return
        self._discard()  # and the exception propagates, naming the final file
        if isinstance(exc, OSError):
            renamed = self._final_names(exc.strerror or str(exc))
            if renamed != (exc.strerror or str(exc)):
                raise OSError(exc.errno, renamed) from exc

    def _swap(self) -> None:
        for tmp, _ in self._staged:
            atomic.fsync_file(tmp)
        entries: list[dict[str, Any]] = [
            {"final": str(final), "tmp": str(tmp), "backup": None, "inode": os.stat(tmp).st_ino}
            for tmp, final in self._staged
        ]
        journal: Path | None = None
        try:
            for entry in entries:  # reserve a backup name for each previous file
                final = Path(entry["final"])
                if final.is_dir():
                    raise IsADirectoryError(f"{final} is a folder; move it away")
                if os.path.lexists(final):
                    entry["backup"] = str(_backup_name(final))
            journal = _write_journal(self.folder, entries)  # then say so, then move
            for entry in entries:
                if entry["backup"]:
                    _keep_previous(Path(entry["final"]), Path(entry["backup"]))
            for entry in entries:
                os.replace(entry["tmp"], entry["final"])
            atomic.sync_folder(self.folder)
        except BaseException:
            _roll_back(entries)
            if journal is not None:
                journal.unlink(missing_ok=True)
            atomic.sync_folder(self.folder)
            raise
        journal.unlink()  # the commit point
        atomic.sync_folder(self.folder)
        for entry in entries:
            if entry["backup"]:
                Path(entry["backup"]).unlink(missing_ok=True)

    def _final_names(self, text: str) -> str:
        """``text`` with each temporary name replaced by the output it stood for."""
        for tmp, final in self._staged:
            if str(tmp) in text:
                text = text.replace(str(tmp), str(final))
                if not final.exists():
                    text = text.replace("the previous file is unchanged", "nothing was written")
        return text

    def _discard(self) -> None:
        for tmp, _ in self._staged:
            try:
                tmp.unlink()
            except OSError:
                pass
        remove_empty(self._created)


def make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    created = []
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_empty(created)
        raise OSError(f"cannot create the output folder {folder} ({exc.strerror or exc})") from exc
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            break
