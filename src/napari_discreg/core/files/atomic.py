"""Files written all-or-nothing: a unique temporary beside the destination, flushed to
disk and renamed onto it (:func:`replace_atomically`); temporaries that a killed process
left behind are removed by the next write in that folder (:func:`remove_stale_temporaries`);
a full disk is an error that says so, with the bytes needed.

The one-file half of the product's output safety; several files written as one are
:class:`~napari_discreg.core.files.transaction.OutputSet`.
"""

from __future__ import annotations

__all__ = [
    "HOST",
    "file_extension",
    "fsync_file",
    "pid_alive",
    "remove_stale_temporaries",
    "replace_atomically",
    "sync_folder",
    "temporary_sibling",
]

import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path


def file_extension(path: Path) -> str:
    """Lower-case extension, ``.nii.gz`` counted as one."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A new, empty, uniquely named hidden file next to ``path``, with the same extension.

    ``out/warped.tif`` -> ``out/.warped.partial-HOST-PID-1a2b3c4d.tif``, created with
    :func:`tempfile.mkstemp` (``O_EXCL``: two processes never get the same name). The
    extension is kept because the writers pick the format (and compression, for
    ``.nii.gz``) from it; host and process id let a later write in the folder remove
    the temporaries of a process that was killed (:func:`remove_stale_temporaries`).
    The caller renames it onto ``path`` or deletes it.
    """
    p = Path(path)
    ext = file_extension(p)
    stem = p.name[: len(p.name) - len(ext)] if ext else p.name
    remove_stale_temporaries(p.parent)
    fd, name = tempfile.mkstemp(
        prefix=f".{stem}{_PARTIAL}{HOST}-{os.getpid()}-", suffix=ext, dir=p.parent
    )
    try:  # mkstemp makes 0600 files: give the file the permissions open() would
        os.chmod(name, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return Path(name)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


_PARTIAL = ".partial-"
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_STALE = re.compile(rf"^\..*{re.escape(_PARTIAL)}{re.escape(HOST)}-(\d+)-[^/]*$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries (:func:`temporary_sibling`) in ``folder`` that a process of
    this machine left behind when it was killed (its process id no longer runs).

    Temporaries of live processes and of other machines (a shared folder) are kept.
    Returns the removed files.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return removed
    for entry in entries:
        m = _STALE.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but not ours, or not checkable: keep it
        return True
    return True


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk (where a full disk shows at the latest)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def sync_folder(folder: str | os.PathLike) -> None:
    """Make the renames in ``folder`` durable (``fsync`` of the folder; POSIX only)."""
    _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in _FULL or "No space left" in str(exc)


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_error(p: Path, exc: BaseException, nbytes: int | None) -> OSError:
    """The error to raise when writing ``p`` failed: a disk-full error names the file,
    the bytes needed and the bytes free."""
    if not _disk_full(exc):
        return OSError(f"cannot write {p} ({exc})")
    try:
        free = f"{shutil.disk_usage(p.parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"about {nbytes:,} bytes" if nbytes else "more space"
    return OSError(
        errno.ENOSPC,
        f"cannot write {p}: the disk is full (it needs {need}, {free} in {p.parent}); "
        + ("the previous file is unchanged" if p.exists() else "nothing was written")
        + "; free some space or write elsewhere",
    )


def replace_atomically(
    path: str | os.PathLike, write: Callable[[Path], None], *, nbytes: int | None = None
) -> Path:
    """Write ``path`` all-or-nothing: ``write(tmp)`` fills a fresh temporary in the same
    folder (:func:`temporary_sibling`), which is flushed to disk (``fsync``) and renamed
    onto ``path`` (:func:`os.replace`); the folder is then synced too.

    On any failure or interruption (``KeyboardInterrupt`` included) the temporary is
    deleted and ``path`` keeps its previous content. An :class:`OSError` names the file;
    on a full disk (``ENOSPC``) it says so, with ``nbytes`` (the expected size) and the
    free space.
    """
    p = Path(path)
    tmp: Path | None = None
    try:
        tmp = temporary_sibling(p)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, p)
        tmp = None
        _fsync_dir(p.parent)
    except OSError as exc:
        if tmp is not None:  # first, so that the free space reported counts it as free
            tmp.unlink(missing_ok=True)
            tmp = None
        raise _write_error(p, exc, nbytes) from exc
    finally:
        if tmp is not None:
            try:
                tmp.unlink()
            except OSError:
                pass
    return p
