"""A multi-file output is one transaction (issue 26, item 2): the folder holds the
complete previous set or the complete new one, whatever fails, signals or kills the run
in the middle of the swap, and the command line says truthfully what was written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from napari_discreg.cli import main
from napari_discreg.core.config import DataConfig
from napari_discreg.core.data.template import load_template, make_pair
from napari_discreg.core.files import atomic, imagefiles, transaction
from napari_discreg.core.files.transaction import OutputSet, recover_interrupted_swaps

NAMES = ["warped.tif", "displacement.npy", "discrepancy.tif", "summary.json"]


def _old_set(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in NAMES:
        (folder / n).write_text("old " + n)


def _contents(folder: Path) -> set[str]:
    return {(folder / n).read_text().split()[0] for n in NAMES}


def _hidden(folder: Path) -> list[str]:
    """Temporaries, backups and journals left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _write_set(folder: Path, tag: str = "new") -> OutputSet:
    with OutputSet(folder) as outputs:
        for n in NAMES:
            outputs.path(n).write_text(f"{tag} {n}")
    return outputs


def test_a_new_set_replaces_the_old_one_and_leaves_nothing_hidden(tmp_path):
    _old_set(tmp_path)
    outputs = _write_set(tmp_path)
    assert outputs.committed
    assert _contents(tmp_path) == {"new"}
    assert _hidden(tmp_path) == []


def test_a_failure_in_the_middle_of_the_renames_rolls_the_whole_set_back(tmp_path, monkeypatch):
    """Before: warped.tif and displacement.npy were replaced, summary.json was old."""
    _old_set(tmp_path)
    real = os.replace
    renamed = []

    def failing(src, dst):
        if Path(dst).name == "discrepancy.tif" and ".partial-" in Path(src).name:
            raise IsADirectoryError(21, "Is a directory", str(dst))
        renamed.append(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(transaction.os, "replace", failing)
    with pytest.raises(OSError, match="nothing was written, the previous files are unchanged"):
        _write_set(tmp_path)
    monkeypatch.setattr(transaction.os, "replace", real)
    assert {"warped.tif", "displacement.npy"} <= set(renamed)  # the failure came late
    assert _contents(tmp_path) == {"old"}
    assert _hidden(tmp_path) == []


def test_an_output_name_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    """Before: exit 2, but warped.tif and displacement.npy were already replaced."""
    pair = make_pair(
        load_template(48), 110, "t1", "t2", np.random.default_rng(0), DataConfig(size=48)
    )
    fixed = imagefiles.write_image(tmp_path / "fixed.tif", pair.fixed)
    moving = imagefiles.write_image(tmp_path / "moving.tif", pair.moving)
    out = tmp_path / "out"
    _old_set(out)
    (out / "discrepancy.tif").unlink()
    (out / "discrepancy.tif").mkdir()
    args = ["register", fixed, moving, "-o", out, "--prealign", "none", "--method", "none"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "discrepancy.tif" in err and "is a folder" in err and "Traceback" not in err
    assert {(out / n).read_text() for n in NAMES if n != "discrepancy.tif"} == {
        f"old {n}" for n in NAMES if n != "discrepancy.tif"
    }


def test_a_folder_appearing_during_the_run_rolls_back(tmp_path):
    _old_set(tmp_path)
    with pytest.raises(OSError, match="is a folder"):
        with OutputSet(tmp_path) as outputs:
            for n in NAMES:
                outputs.path(n).write_text("new")
            (tmp_path / "summary.json").unlink()
            (tmp_path / "summary.json").mkdir()
    assert {(tmp_path / n).read_text() for n in NAMES[:3]} == {f"old {n}" for n in NAMES[:3]}
    assert _hidden(tmp_path) == []


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_swap_waits_until_the_set_is_complete(tmp_path, monkeypatch, signum):
    """Before: SIGINT or SIGTERM between two renames left a mixed set."""
    from napari_discreg.cli import _sigterm_as_interrupt

    _old_set(tmp_path)
    real = os.replace

    def signalling(src, dst):
        real(src, dst)
        if Path(dst).name == "warped.tif":
            os.kill(os.getpid(), signum)  # arrives between the first and second rename

    monkeypatch.setattr(transaction.os, "replace", signalling)
    outputs = None
    with _sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        outputs = OutputSet(tmp_path)
        with outputs:
            for n in NAMES:
                outputs.path(n).write_text(f"new {n}")
    assert outputs is not None and outputs.committed  # raised after the commit
    assert _contents(tmp_path) == {"new"}
    assert _hidden(tmp_path) == []


_KILLED_MID_SWAP = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from napari_discreg.core.files import transaction
    folder = Path(sys.argv[1])
    real = os.replace
    def kill_after_first(src, dst):
        real(src, dst)
        if Path(dst).name == "warped.tif":
            os.kill(os.getpid(), signal.SIGKILL)
    transaction.os.replace = kill_after_first
    with transaction.OutputSet(folder) as outputs:
        for n in {names!r}:
            outputs.path(n).write_text("new " + n)
    """
)


def test_sigkill_in_the_middle_of_the_swap_is_rolled_back_by_the_next_run(tmp_path):
    """Before: a SIGKILL during the renames left warped.tif new and the others old."""
    _old_set(tmp_path)
    script = _KILLED_MID_SWAP.format(names=NAMES)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "warped.tif").read_text().startswith("new")  # killed mid-swap
    assert any(n.startswith(".napari-discreg-swap-") for n in _hidden(tmp_path))
    assert recover_interrupted_swaps(tmp_path) == 1
    assert _contents(tmp_path) == {"old"}
    leftovers = [n for n in _hidden(tmp_path) if ".partial-" not in n]  # stale temporaries
    assert leftovers == []  # are removed by the next write (test_hardening_files)
    atomic.remove_stale_temporaries(tmp_path)
    assert _hidden(tmp_path) == []


def test_the_next_output_set_recovers_a_killed_swap_before_writing(tmp_path):
    _old_set(tmp_path)
    script = _KILLED_MID_SWAP.format(names=NAMES)
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=120)
    with OutputSet(tmp_path):  # entering recovers, before anything is written
        assert _contents(tmp_path) == {"old"}
    _write_set(tmp_path, "third")
    assert _contents(tmp_path) == {"third"}
    assert _hidden(tmp_path) == []


def test_interrupted_after_writing_says_the_outputs_were_written(
    tmp_path, capsys, monkeypatch, tiny_checkpoint
):
    """Before: Ctrl-C after the outputs were written printed 'nothing was written'."""
    from napari_discreg.cli import register as cli_register

    pair = make_pair(
        load_template(48), 110, "t1", "t2", np.random.default_rng(0), DataConfig(size=48)
    )
    fixed = imagefiles.write_image(tmp_path / "fixed.tif", pair.fixed)
    moving = imagefiles.write_image(tmp_path / "moving.tif", pair.moving)
    out = tmp_path / "out"

    def interrupted(message: str = "") -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_register, "_say", interrupted)
    args = ["register", fixed, moving, "-o", out, "--model", tiny_checkpoint]
    assert main([str(a) for a in args + ["--prealign", "none"]]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; the outputs were written to {out}" in err
    assert (out / "summary.json").is_file()


def test_a_console_that_cannot_be_written_changes_nothing(tmp_path, monkeypatch, tiny_checkpoint):
    """Before: ``register ... >/dev/full`` exited 2 after all outputs were written."""

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

        def isatty(self):
            return False

    pair = make_pair(
        load_template(48), 110, "t1", "t2", np.random.default_rng(0), DataConfig(size=48)
    )
    fixed = imagefiles.write_image(tmp_path / "fixed.tif", pair.fixed)
    moving = imagefiles.write_image(tmp_path / "moving.tif", pair.moving)
    monkeypatch.setattr(sys, "stdout", Full())
    monkeypatch.setattr(sys, "stderr", Full())
    args = ["register", fixed, moving, "-o", tmp_path / "out", "--model", tiny_checkpoint]
    assert main([str(a) for a in args + ["--prealign", "none"]]) == 0
    assert (tmp_path / "out" / "summary.json").is_file()
    assert main([str(a) for a in ["register", tmp_path / "missing.tif", moving, "-o", "x"]]) == 2


def test_an_unreadable_journal_keeps_the_backups_of_its_process(tmp_path):
    """A journal that cannot be read is left alone, and so are its process's backups:
    where links were not possible a backup may hold the only copy of a previous file."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    journal = tmp_path / f".napari-discreg-swap-{atomic.HOST}-{pid}-abcd1234.json"
    journal.write_text("{not json")
    backup = tmp_path / f".warped.previous-{atomic.HOST}-{pid}-0a1b2c3d.tif"
    backup.write_text("the only copy")
    assert recover_interrupted_swaps(tmp_path) == 0
    assert backup.read_text() == "the only copy" and journal.exists()
    journal.unlink()
    recover_interrupted_swaps(tmp_path)  # no journal: a backup left after a commit goes
    assert not backup.exists()
