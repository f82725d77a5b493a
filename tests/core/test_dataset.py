"""Datasets of the user's own images: slicing, foreground, pairs, bad input, CLI runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_discreg.core.data.folders as dataset_mod
from napari_discreg.cli import main
from napari_discreg.core.config import DataConfig, FolderConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.data.folders import (
    BadInputError,
    PairBatches,
    PairMaker,
    SliceDataset,
    evaluate_pairs,
    list_images,
    load_paired,
    make_pairs,
    shard,
    split_holdout,
    synthetic_pair,
)
from napari_discreg.core.files import imagefiles
from napari_discreg.core.files.checkpoint import checkpoint_info, load_model
from napari_discreg.core.registration.warp import warp_numpy

SIZE = 48
TINY = ["--num-labels", "5", "--capture-range", "2", "--features", "4", "--head-channels", "8"]
CLEAN = DataConfig(size=SIZE, noise=0.0, bias=0.0, blur=0.0, max_displacement=3.0)


@pytest.fixture(scope="module")
def template():
    return data.load_template(SIZE)


@pytest.fixture(scope="module")
def scans(tmp_path_factory, template):
    """t1/ and t2/: two co-registered 'subjects' as NIfTI volumes (x, y, z) with empty
    slices at both ends; t1_2d/: three 2D slices as PNG, TIFF and .npy."""
    root = tmp_path_factory.mktemp("scans")
    cfg = DataConfig(size=SIZE)
    for s, lo in enumerate((50, 70)):
        t1 = np.asarray(template.t1[lo : lo + 8])
        t2 = np.stack(
            [
                data.synthesize_contrast(template, k, "t2", np.random.default_rng(k), cfg)
                for k in range(lo, lo + 8)
            ]
        )
        for name, vol in (("t1", t1), ("t2", t2)):
            (root / name).mkdir(exist_ok=True)
            padded = np.concatenate([np.zeros((2, SIZE, SIZE)), vol, np.zeros((3, SIZE, SIZE))])
            imagefiles.write_image(
                root / name / f"sub{s}.nii.gz", padded.transpose(1, 2, 0) * 800.0
            )
    (root / "t1_2d").mkdir()
    for ext, k in ((".png", 60), (".tif", 65), (".npy", 70)):
        imagefiles.write_image(
            root / "t1_2d" / f"slice{k}{ext}", (template.t1[k] * 255).astype(np.uint8)
        )
    return root


# ------------------------------------------------------------------------ slices


def test_volumes_give_their_foreground_slices(scans):
    ds = SliceDataset.from_paths(scans / "t1", size=SIZE, name="source")
    assert len(ds) == 16 and ds.images.shape == (16, SIZE, SIZE) and ds.images.dtype == np.float32
    # the empty slices at both ends are left out; NIfTI volumes are sliced along axis 2
    assert ds.slice_index.tolist() == list(range(2, 10)) * 2
    assert ds.file_index.tolist() == [0] * 8 + [1] * 8
    assert ds.images.min() >= 0 and ds.images.max() <= 1 and set(np.unique(ds.masks)) == {0, 1}
    assert ds.positions[0] == 0 and ds.positions[7] == 1
    item = ds[3]
    assert item["image"].shape == (1, SIZE, SIZE) and item["slice"] == 5 and item["file"] == 0
    assert "16 slices of 48 x 48 px from 2 file(s)" in ds.describe()
    # another axis gives other slices (every plane along axis 0 that holds enough brain)
    other = SliceDataset.from_paths(scans / "t1", size=32, config=FolderConfig(axis=0))
    assert other.images.shape[1:] == (32, 32) and len(other) != len(ds)


def test_2d_images_of_mixed_formats(scans):
    ds = SliceDataset.from_paths(scans / "t1_2d", size=SIZE)
    assert len(ds) == 3 and [f.suffix for f in ds.used_files] == [".png", ".tif", ".npy"]
    # a list of a file and a folder, in order; a 2D image among volumes needs consent
    paths = [scans / "t1_2d" / "slice60.png", scans / "t1"]
    with pytest.raises(BadInputError, match="slice60.png: is a 2D image of 48 x 48, but 2 of"):
        SliceDataset.from_paths(paths, size=SIZE)
    ds = SliceDataset.from_paths(paths, size=SIZE, allow_mixed_shapes=True)
    assert len(ds.files) == 3 and len(ds) == 17 and ds.file_index[0] == 0


def test_aspect_ratio_is_kept_by_padding(tmp_path):
    image = np.zeros((40, 100), np.float32)
    image[10:30, 10:90] = 1.0  # an 80 x 20 bright box
    imagefiles.write_image(tmp_path / "wide.tif", image)
    ds = SliceDataset.from_paths(tmp_path, size=64, config=FolderConfig(margin=0.0))
    rows, cols = np.nonzero(ds.masks[0])
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert width == 64 and abs(height - 16) <= 1  # 80 x 20 -> 64 x 16, padded to 64 x 64


def test_noisy_background_stays_background(tmp_path, template):
    rng = np.random.default_rng(0)
    vol = np.asarray(template.t1[60:64]) * 1000 + rng.normal(0, 20, (4, SIZE, SIZE))
    imagefiles.write_image(tmp_path / "noisy.npy", vol.astype(np.float32))
    ds = SliceDataset.from_paths(tmp_path, size=SIZE, config=FolderConfig(margin=0.0))
    brain = np.asarray(template.mask[60:64]) > 0
    # the crop box is the brain's, so compare areas: background noise is not foreground
    assert abs(ds.masks.sum() / brain.sum() - 1) < 0.35


# ------------------------------------------------------------------------- pairs


def test_pairs_follow_the_make_pair_convention(scans):
    ds = SliceDataset.from_paths(scans / "t1", size=SIZE)
    pair = synthetic_pair(
        ds.images[4], ds.masks[4], ds.images[4], ds.masks[4], np.random.default_rng(1), CLEAN
    )
    assert pair["displacement"].shape == (2, SIZE, SIZE)
    assert 1.5 <= np.sqrt((pair["displacement"] ** 2).sum(0)).max() <= 3.0
    # fixed = moving warped by the true field: warping moving with it recovers fixed
    np.testing.assert_allclose(
        warp_numpy(pair["moving"], pair["displacement"]), pair["fixed"], atol=1e-5
    )
    assert not np.allclose(pair["fixed"], pair["moving"], atol=0.05)
    # with the default appearance model, bias and noise are independent per image
    noisy = synthetic_pair(
        ds.images[4], ds.masks[4], ds.images[4], ds.masks[4], np.random.default_rng(1), DataConfig()
    )
    assert np.abs(noisy["moving"] - ds.images[4]).mean() > 0.01


def test_batches_are_deterministic_sharded_and_resumable(scans):
    ds = SliceDataset.from_paths(scans / "t1", size=SIZE)
    maker = PairMaker(ds, config=DataConfig(size=SIZE))
    one = PairBatches(maker, batch_size=4, seed=3)
    b = one.batch(2)
    assert b["fixed"].shape == (4, 1, SIZE, SIZE) and b["displacement"].shape == (4, 2, SIZE, SIZE)
    assert b["mask"].dtype == torch.float32
    assert all(torch.equal(b[k], one.batch(2)[k]) for k in b)
    stream = one.iterate(2)
    assert all(torch.equal(b[k], v) for k, v in next(stream).items())
    # ranks draw disjoint shards of every epoch (16 slices: 8 per rank, 2 batches each)
    ranks = [PairBatches(maker, batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen = [np.concatenate([r.items(0), r.items(1)]) for r in ranks]
    assert sorted(np.concatenate(seen).tolist()) == list(range(16))
    # a new epoch reshuffles
    assert not np.array_equal(ranks[0].items(2), ranks[0].items(0))
    assert shard([4, 5, 6], 1, 2).tolist() == [5, 4]


def test_batches_from_worker_processes_are_the_same(scans):
    ds = SliceDataset.from_paths(scans / "t1_2d", size=SIZE)
    batches = PairBatches(PairMaker(ds, config=DataConfig(size=SIZE)), batch_size=2)
    first = next(batches.iterate(5, workers=1))
    assert all(torch.equal(first[k], batches.batch(5)[k]) for k in first)


def test_paired_target_is_slice_aligned(scans):
    t1, t2 = load_paired(scans / "t1", scans / "t2", size=SIZE)
    assert len(t1) == len(t2) and np.array_equal(t1.slice_index, t2.slice_index)
    assert not np.allclose(t1.images, t2.images)  # other contrast, same anatomy
    # same crop box: the brain masks of the two contrasts coincide
    assert np.mean(t1.masks != t2.masks) < 0.05
    maker = PairMaker(t1, t2, pairing="paired", config=CLEAN)
    pairs = make_pairs(maker, range(len(t1)), 3, seed=0)
    assert pairs.displacement is not None and pairs.fixed.shape == (3, SIZE, SIZE)
    assert "same slice" in maker.describe()
    again = make_pairs(maker, range(len(t1)), 3, seed=0)
    assert np.array_equal(pairs.fixed, again.fixed)


def test_unpaired_target_matches_relative_positions(scans):
    t1 = SliceDataset.from_paths(scans / "t1", size=SIZE)
    t2 = SliceDataset.from_paths(scans / "t2" / "sub1.nii.gz", size=SIZE)
    maker = PairMaker(t1, t2, pairing="unpaired")
    rng = np.random.default_rng(0)
    for i in (0, 5, 7, 12):
        assert t2.positions[maker.partner(i, rng)] == pytest.approx(t1.positions[i], abs=0.08)
    pairs = make_pairs(maker, range(len(t1)), 2)
    assert pairs.displacement is None and "no ground truth" in maker.describe()
    with pytest.raises(ValueError, match="no ground truth"):
        evaluate_pairs(None, pairs)


def test_holdout_splits_by_file_or_by_slice_block(scans):
    ds = SliceDataset.from_paths(scans / "t1", size=SIZE)
    train, val, how = split_holdout(ds, 0.1, seed=0)
    assert len(np.unique(ds.file_index[val])) == 1 and "1 of 2 files" in how
    assert not set(ds.file_index[train]) & set(ds.file_index[val])
    one = SliceDataset.from_paths(scans / "t1" / "sub0.nii.gz", size=SIZE)
    train, val, how = split_holdout(one, 0.25)
    assert val.tolist() == [6, 7] and train.tolist() == list(range(6)) and "last 2" in how
    single = SliceDataset.from_paths(scans / "t1_2d" / "slice60.png", size=SIZE)
    assert split_holdout(single, 0.1)[1].size == 0
    assert split_holdout(ds, 0.0)[1].size == 0


def test_evaluation_of_a_model_on_pairs_with_truth(scans, tiny_model):
    ds = SliceDataset.from_paths(scans / "t1_2d", size=SIZE)
    pairs = make_pairs(PairMaker(ds, config=DataConfig(size=SIZE)), range(3), 2)
    result = evaluate_pairs(tiny_model, pairs)
    assert set(result) == {"identity", "model"}
    assert set(result["model"]) == {"label_accuracy", "epe", "folding", "seconds"}
    assert 0 <= result["model"]["label_accuracy"] <= 1 and result["identity"]["epe"] > 0


# --------------------------------------------------------------------- bad input


def test_empty_or_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: the folder holds no images .*it is empty"):
        list_images(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images .*it holds readme.txt"):
        SliceDataset.from_paths(tmp_path / "notes")
    with pytest.raises(ValueError, match="nowhere: no such file or folder"):
        SliceDataset.from_paths(tmp_path / "nowhere")


def _bad_folder(tmp_path, template):
    folder = tmp_path / "mixed"
    folder.mkdir()
    vol = np.asarray(template.t1[55:63]).transpose(1, 2, 0)
    imagefiles.write_image(folder / "a.nii.gz", vol)
    imagefiles.write_image(folder / "b.nii.gz", vol)
    imagefiles.write_image(folder / "c_small.nii.gz", vol[:40])  # a volume of another size
    imagefiles.write_image(folder / "d_slice.tif", template.t1[60])  # a 2D image among volumes
    (folder / "e_broken.png").write_bytes(b"not a png at all")
    imagefiles.write_image(folder / "f_blank.nii.gz", np.zeros_like(vol))  # nothing in it
    return folder


def test_bad_files_are_named_and_can_be_skipped(tmp_path, template):
    folder = _bad_folder(tmp_path, template)
    with pytest.raises(BadInputError) as info:
        SliceDataset.from_paths(folder, size=SIZE, name="source")
    message = str(info.value)
    assert "source: 4 of 6 files cannot be used" in message and "--skip-bad" in message
    for name, why in (
        ("c_small.nii.gz", "a volume of 8 slices of 40 x 48"),
        ("d_slice.tif", "a 2D image of 48 x 48"),
        ("e_broken.png", "cannot be read"),
        ("f_blank.nii.gz", "no slice has 64 or more foreground pixels"),
    ):
        line = next(x for x in message.splitlines() if name in x)
        assert why in line, line
    assert {b.path.name for b in info.value.bad} == {
        "c_small.nii.gz",
        "d_slice.tif",
        "e_broken.png",
        "f_blank.nii.gz",
    }
    ds = SliceDataset.from_paths(folder, size=SIZE, skip_bad=True)
    assert [f.name for f in ds.used_files] == ["a.nii.gz", "b.nii.gz"] and len(ds.bad) == 4
    assert "4 bad file(s) skipped" in ds.describe()
    mixed = SliceDataset.from_paths(folder, size=SIZE, skip_bad=True, allow_mixed_shapes=True)
    assert len(mixed.used_files) == 4  # only the unreadable and the blank file left out


def test_nothing_usable(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(BadInputError, match="none of the 1 files can be used"):
        SliceDataset.from_paths(tmp_path, skip_bad=True)


def test_paired_folders_must_match(tmp_path, scans, template):
    with pytest.raises(ValueError, match="the counts must be equal"):
        load_paired(scans / "t1", scans / "t1_2d")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    imagefiles.write_image(tmp_path / "a" / "s.tif", template.t1[60])
    imagefiles.write_image(tmp_path / "b" / "s.tif", template.t1[60][:40])
    with pytest.raises(BadInputError, match=r"b/s.tif: is a 2D image of 40 x 48 but its partner"):
        load_paired(tmp_path / "a", tmp_path / "b")


# ------------------------------------------------------------------ command line


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_cli_train_on_a_folder_with_bad_files(tmp_path, template, capsys):
    folder = _bad_folder(tmp_path, template)
    out = tmp_path / "out" / "m.safetensors"
    base = ["train", "--source", str(folder), "-o", str(out), "--size", str(SIZE), *TINY]
    assert main([*base, "--steps", "2", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "e_broken.png" in err and "c_small.nii.gz" in err and "--skip-bad" in err
    assert not (tmp_path / "out").exists()
    assert (
        main([*base, "--steps", "3", "--batch-size", "2", "--skip-bad", "--eval-pairs", "2"]) == 0
    )
    captured = capsys.readouterr()
    assert captured.err.count("warning: skipped") == 4
    assert "held-out evaluation (2 pairs)" in captured.out
    info = checkpoint_info(out)["training"]
    assert len(info["source_data"]["skipped"]) == 4 and info["source"] == [str(folder.resolve())]
    assert info["evaluation"]["model"]["label_accuracy"] >= 0
    assert _tree(tmp_path / "out") == ["m.safetensors"]  # no state without --checkpoint-every


def test_cli_resume_continues_exactly(tmp_path, scans, monkeypatch, capsys):
    base = ["train", "--source", str(scans / "t1"), "--size", str(SIZE), "--steps", "4"]
    base += ["--batch-size", "2", "--lr", "0.01", "--val-fraction", "0", *TINY]
    assert main([*base, "-o", str(tmp_path / "full.safetensors")]) == 0

    original = PairBatches.batch

    def interrupt_at_step_3(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step)

    out = tmp_path / "m.safetensors"
    monkeypatch.setattr(dataset_mod.PairBatches, "batch", interrupt_at_step_3)
    assert main([*base, "-o", str(out), "--checkpoint-every", "1"]) == 130
    assert "resume with: napari-discreg train --resume" in capsys.readouterr().out
    state = tmp_path / "m.state.safetensors"
    assert checkpoint_info(state)["training"]["completed_steps"] == 2
    load_model(state)  # a training state is a usable model too
    monkeypatch.setattr(dataset_mod.PairBatches, "batch", original)
    assert main(["train", "--resume", str(state), "-o", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    full, resumed = load_model(tmp_path / "full.safetensors"), load_model(out)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    info = checkpoint_info(out)["training"]
    assert info["completed_steps"] == 4 and info["resumed_from"] == str(state)
    # a plain model is not a training state
    assert main(["train", "--resume", str(tmp_path / "full.safetensors"), "-o", str(out)]) == 2
    assert "without a training state" in capsys.readouterr().err


def test_cli_adapt_with_paired_and_unpaired_folders(tmp_path, scans, capsys):
    model = tmp_path / "m.safetensors"
    assert main(["train", "-o", str(model), "--steps", "1", "--size", str(SIZE), *TINY]) == 0
    out = tmp_path / "a.safetensors"
    base = ["adapt", "--model", str(model), "-o", str(out), "--steps", "1", "--batch-size", "2"]
    base += ["--size", str(SIZE), "--target-pairs", "4", "--eval-pairs", "2"]
    assert main([*base, "--source", str(scans / "t1"), "--target", str(scans / "t2")]) == 0
    text = capsys.readouterr().out
    assert "paired: each fixed (--source) slice vs the same slice" in text
    meta = checkpoint_info(out)["adaptation"]
    assert meta["pairing"] == "paired" and meta["target_pairs"] == 4
    assert set(meta["evaluation"]) == {"pairs", "held_out", "identity", "before", "after"}
    assert "mono-modal" in meta["source"]
    one = scans / "t2" / "sub0.nii.gz"
    assert main([*base, "--target", str(scans / "t1"), "--target-moving", str(one)]) == 0
    text = capsys.readouterr().out
    assert "unpaired: each fixed (--target) slice" in text and "cannot be matched" in text
    meta = checkpoint_info(out)["adaptation"]
    assert meta["pairing"] == "unpaired" and meta["evaluation"] is None
    assert main([*base, "--target", str(scans / "t2")]) == 2
    assert "give the fixed contrast with --source" in capsys.readouterr().err
