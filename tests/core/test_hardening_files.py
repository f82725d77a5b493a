"""Files under stress (issue 17): decompression bombs, full disks, unique temporaries,
outputs that would replace inputs, concurrent runs into one folder, Ctrl-C over a
complete model, and an exact resume on the built-in template."""

from __future__ import annotations

import errno
import gzip
import os
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from napari_discreg.core.files import atomic, imagefiles
from napari_discreg.core.files.checkpoint import save_checkpoint

BIG = (1024, 1024, 1024)  # 2**30 voxels: 4 GiB as float32


def _bomb_tiff(path: Path) -> Path:
    """A 1.3 MB TIFF that declares a 1024^3 uint8 volume (pre-compressed zero tiles)."""
    import tifffile

    tile = zlib.compress(np.zeros(BIG[1:], np.uint8).tobytes(), 9)
    tifffile.imwrite(
        path,
        data=(tile for _ in range(BIG[0])),
        shape=BIG,
        dtype=np.uint8,
        compression="zlib",
        tile=BIG[1:],
    )
    return path


def _bomb_nifti(path: Path) -> Path:
    """A 100-byte .nii.gz whose header declares a 1024^3 float32 volume."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(BIG)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 4096)
    return path


def _bomb_npy(path: Path) -> Path:
    """A .npy header that declares 1024^3 float32 with almost no data behind it."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": BIG}
        )
        fh.write(b"\0" * 64)
    return path


@pytest.mark.parametrize(
    "make", [_bomb_tiff, _bomb_nifti, _bomb_npy], ids=["tiff", "nii.gz", "npy"]
)
@pytest.mark.parametrize(
    "reader", [imagefiles.read_stack, imagefiles.read_image], ids=["stack", "image"]
)
def test_readers_refuse_a_declared_huge_volume_before_decoding(tmp_path, make, reader):
    ext = {"_bomb_tiff": ".tif", "_bomb_nifti": ".nii.gz", "_bomb_npy": ".npy"}[make.__name__]
    path = make(tmp_path / f"bomb{ext}")
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="1,073,741,824 voxels.*limit of 268,435,456"):
            reader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20e6  # nothing of the 4 GiB was allocated


def test_png_bomb_refused_from_its_size(tmp_path):
    """A PNG header is read by Pillow; the limit applies to its width x height."""
    img = np.zeros((64, 80), np.uint8)
    imagefiles.write_image(tmp_path / "a.png", img)
    with pytest.raises(ValueError, match="5,120 voxels.*limit of 1,000"):
        imagefiles.read_image(tmp_path / "a.png", max_voxels=1000)
    assert imagefiles.read_image(tmp_path / "a.png", max_voxels=5120).shape == (64, 80)


def test_voxel_limit_is_settable(tmp_path, monkeypatch):
    np.save(tmp_path / "v.npy", np.zeros((4, 10, 10), np.float32))
    assert imagefiles.read_stack(tmp_path / "v.npy").shape == (4, 10, 10)
    monkeypatch.setenv(imagefiles.MAX_VOXELS_ENV, "399")
    with pytest.raises(ValueError, match="400 voxels.*NAPARI_DISCREG_MAX_VOXELS"):
        imagefiles.read_stack(tmp_path / "v.npy")
    assert imagefiles.read_stack(tmp_path / "v.npy", max_voxels=400).shape == (4, 10, 10)
    monkeypatch.setenv(imagefiles.MAX_VOXELS_ENV, "lots")
    with pytest.raises(ValueError, match="not a whole number"):
        imagefiles.read_stack(tmp_path / "v.npy")


# ------------------------------------------------------------------ atomic, unique writes


def _leftovers(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if ".partial-" in p.name or p.name.endswith(".tmp")
    )


def test_temporaries_are_unique_and_created_exclusively(tmp_path):
    a = atomic.temporary_sibling(tmp_path / "m.safetensors")
    b = atomic.temporary_sibling(tmp_path / "m.safetensors")
    assert a != b and a.is_file() and b.is_file()
    assert a.name.startswith(".m.partial-") and a.name.endswith(".safetensors")
    assert f"-{os.getpid()}-" in a.name


def test_two_checkpoint_writes_never_share_a_temporary(tmp_path, tiny_model, monkeypatch):
    """The fixed ``<out>.tmp`` let two runs write into one temporary file."""
    seen = []
    real = atomic.fsync_file

    def spy(path):
        seen.append(Path(path).name)
        real(path)

    monkeypatch.setattr(atomic, "fsync_file", spy)
    save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    assert len(seen) == 2 and seen[0] != seen[1]
    assert not any(n.endswith(".tmp") for n in seen)
    assert _leftovers(tmp_path) == []


def test_temporaries_of_a_killed_process_are_removed_later(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.partial-{atomic.HOST}-{dead.pid}-abcd1234.safetensors"
    live = tmp_path / f".m.partial-{atomic.HOST}-{os.getppid()}-abcd1234.safetensors"
    other_host = tmp_path / f".m.partial-otherhost-{dead.pid}-abcd1234.safetensors"
    for p in (stale, live, other_host):
        p.write_bytes(b"x")
    imagefiles.write_image(tmp_path / "a.tif", np.zeros((4, 4), np.float32))
    assert not stale.exists()
    assert live.exists() and other_host.exists()


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_on_a_model_keeps_the_previous_file(tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "m.safetensors"
    save_checkpoint(tiny_model, out)
    before = out.read_bytes()
    monkeypatch.setattr(atomic, "fsync_file", _enospc)
    with pytest.raises(
        OSError, match=r"m\.safetensors: the disk is full \(it needs about [\d,]+ bytes"
    ) as err:
        save_checkpoint(tiny_model, out)
    assert err.value.errno == errno.ENOSPC
    assert "previous file is unchanged" in str(err.value)
    assert out.read_bytes() == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["w.tif", "w.nii.gz", "w.npy", "w.png"])
def test_full_disk_on_an_image_keeps_the_previous_file(tmp_path, monkeypatch, name):
    out = tmp_path / name
    imagefiles.write_image(out, np.ones((8, 8), np.float32))
    before = out.read_bytes()
    monkeypatch.setattr(imagefiles, "_write_raw", _enospc)
    with pytest.raises(OSError, match="the disk is full") as err:
        imagefiles.write_image(out, np.zeros((8, 8), np.float32))
    assert err.value.errno == errno.ENOSPC and str(out) in str(err.value)
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_ctrl_c_during_a_write_leaves_no_temporary(tmp_path, monkeypatch):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "fsync_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        imagefiles.write_image(tmp_path / "a.tif", np.zeros((4, 4), np.float32))
    assert list(tmp_path.iterdir()) == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


def test_real_full_disk_on_a_small_tmpfs(tmp_path, tiny_model):
    """The tester's case on a real 64 kB tmpfs (only where the tests run as root)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("needs root on Linux to mount a tmpfs")
    try:
        small = disk / "m.safetensors"
        save_checkpoint(tiny_model, small)  # the tiny model fits
        before = small.read_bytes()
        (disk / "fill").write_bytes(b"\0" * (64 * 1024 - 2 * len(before) + 4096))
        big = tiny_model
        with pytest.raises(OSError, match="the disk is full"):
            save_checkpoint(big, small, extra={"pad": "x" * 3 * len(before)})
        assert small.read_bytes() == before and _leftovers(disk) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ---------------------------------------------------------------- the command line

import threading  # noqa: E402

import napari_discreg.core.learning.train as train_mod  # noqa: E402
from napari_discreg.cli import main  # noqa: E402
from napari_discreg.core.files import transaction  # noqa: E402
from napari_discreg.core.files.checkpoint import checkpoint_info  # noqa: E402
from napari_discreg.core.learning.train import StepRecord  # noqa: E402

SIZE = 48
TINY = ["--num-labels", "5", "--capture-range", "2", "--features", "4", "--head-channels", "8"]
TRAIN = ["--size", SIZE, "--batch-size", 2, *TINY]


def run(*args) -> int:
    return main([str(a) for a in args])


def test_register_refuses_to_write_over_its_input(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    img = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    fixed = imagefiles.write_image(out / "warped.tif", img)
    moving = imagefiles.write_image(tmp_path / "moving.tif", img)
    before = fixed.read_bytes()
    assert run("register", fixed, moving, "-o", out, "--model", tiny_checkpoint) == 2
    err = capsys.readouterr().err
    assert "would overwrite the input FIXED" in err and str(fixed) in err
    assert fixed.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["warped.tif"]


def test_model_output_must_be_safetensors_and_no_input(tmp_path, tiny_checkpoint, capsys):
    target = imagefiles.write_image(tmp_path / "tf.tif", np.zeros((2, 48, 48), np.float32))
    before = target.read_bytes()
    assert run("adapt", "--target", target, "-o", target, "--model", tiny_checkpoint) == 2
    assert "a model is written as a .safetensors file" in capsys.readouterr().err
    assert target.read_bytes() == before
    assert run("train", "-o", tmp_path / "m.tif", *TRAIN) == 2
    assert ".safetensors" in capsys.readouterr().err
    model_before = tiny_checkpoint.read_bytes()
    assert run("adapt", "--demo-target", 2, "-o", tiny_checkpoint, "--model", tiny_checkpoint) == 2
    assert "would overwrite the input --model" in capsys.readouterr().err
    assert tiny_checkpoint.read_bytes() == model_before
    state = tmp_path / "m.state.safetensors"
    state.write_bytes(model_before)
    assert run("adapt", "--demo-target", 2, "-o", state, "--resume", state) == 2
    assert "would overwrite the input --resume" in capsys.readouterr().err
    # the state written beside -o would replace the base model
    assert run("adapt", "--demo-target", 2, "-o", tmp_path / "m.safetensors", "--model", state) == 2
    assert "the state written beside it" in capsys.readouterr().err


def test_ctrl_c_keeps_a_complete_model_and_writes_the_partial_beside_it(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "m.safetensors"
    assert run("train", "-o", out, "--steps", 2, *TRAIN) == 0
    complete = out.read_bytes()
    capsys.readouterr()

    def interrupted(model, *, config, **kwargs):
        yield StepRecord(1, config.steps, {"loss": 1.0, "accuracy": 0.5})
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_steps", interrupted)
    assert run("train", "-o", out, "--steps", 10, *TRAIN) == 130
    partial = tmp_path / "m.partial.safetensors"
    assert out.read_bytes() == complete
    assert checkpoint_info(partial)["training"]["interrupted"] is True
    said = capsys.readouterr().out
    assert f"saved the model trained so far to {partial}" in said and f"{out} was kept" in said


def _state_disk_full(monkeypatch):
    real = atomic.fsync_file

    def fsync(path):
        if ".state." in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(atomic, "fsync_file", fsync)


def test_full_disk_for_the_training_state_saves_the_model_and_exits_2(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "m.safetensors"
    _state_disk_full(monkeypatch)
    rc = run("train", "-o", out, "--steps", 3, "--checkpoint-every", 1, *TRAIN)
    captured = capsys.readouterr()
    assert rc == 2
    assert "disk is full" in captured.err and "m.state.safetensors" in captured.err
    assert "Traceback" not in captured.err and "SafetensorError" not in captured.err
    assert checkpoint_info(out)["training"]["completed_steps"] == 3  # the model fitted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_full_disk_for_the_adaptation_state_saves_the_model_and_exits_2(
    tmp_path, tiny_checkpoint, capsys, monkeypatch
):
    out = tmp_path / "a.safetensors"
    _state_disk_full(monkeypatch)
    argv = ["adapt", "-o", out, "--model", tiny_checkpoint, "--demo-target", 2, "--steps", 2]
    rc = run(*argv, "--size", SIZE, "--batch-size", 2, "--checkpoint-every", 1)
    captured = capsys.readouterr()
    assert rc == 2 and "disk is full" in captured.err and "a.state.safetensors" in captured.err
    assert checkpoint_info(out)["adaptation"]["completed_steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_full_disk_for_the_model_exits_2_with_the_previous_model_intact(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "m.safetensors"
    assert run("train", "-o", out, "--steps", 1, *TRAIN) == 0
    before = out.read_bytes()
    monkeypatch.setattr(atomic, "fsync_file", _enospc)
    assert run("train", "-o", out, "--steps", 2, *TRAIN) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: the disk is full" in err and "previous file is unchanged" in err
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_two_runs_into_one_folder_never_mix_their_outputs(tmp_path, monkeypatch):
    """Run A pauses in the middle of its renames while run B commits: without the
    folder lock B's files land between A's and the folder ends up mixed."""
    folder = tmp_path / "out"
    names = ["warped.tif", "displacement.npy", "summary.json"]
    a_paused, release = threading.Event(), threading.Event()
    real_replace = os.replace

    def slow_replace(src, dst):
        real_replace(src, dst)
        if threading.current_thread().name == "A" and Path(dst).name == names[0]:
            a_paused.set()
            release.wait(5)

    monkeypatch.setattr(transaction.os, "replace", slow_replace)

    def write(tag: str) -> None:
        with transaction.OutputSet(folder) as outputs:
            for n in names:
                outputs.path(n).write_text(tag)

    a = threading.Thread(target=write, args=("A",), name="A")
    b = threading.Thread(target=write, args=("B",), name="B")
    a.start()
    assert a_paused.wait(5)
    b.start()
    b.join(0.5)  # B must wait for A's lock, not finish in between
    release.set()
    a.join(5)
    b.join(5)
    contents = {(folder / n).read_text() for n in names}
    assert len(contents) == 1, contents
    assert _leftovers(folder) == []


def test_written_files_get_the_usual_permissions(tmp_path, tiny_model):
    """mkstemp creates 0600 files; outputs keep the permissions open() gives."""
    mask = os.umask(0o022)
    os.umask(mask)
    out = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_resume_on_the_built_in_template_is_bit_identical(tmp_path):
    """A resumed run used to draw a new template stream (up to 7.7e-3 apart)."""
    base = ["--steps", 4, "--checkpoint-every", 2, *TRAIN]
    assert run("train", "-o", tmp_path / "full.safetensors", *base) == 0
    half = tmp_path / "half.safetensors"
    real = train_mod.train_steps

    def stop_after_two(model, **kwargs):
        for record in real(model, **kwargs):
            yield record
            if record.iteration == 2:
                raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "train_steps", stop_after_two)
        assert run("train", "-o", half, *base) == 130
    assert run("train", "--resume", tmp_path / "half.state.safetensors", "-o", half) == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full.safetensors"), load_file(half)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff == 0.0, diff
