"""The target pairs of an adaptation run: the kinds a spec may name (arrays,
ready-made pair files, folders of a second contrast, built-in demo pairs, or the
command line's options) and reading them into arrays, with the pairing, hold-out split
and per-rank shard of folder targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import DataConfig, FolderConfig
from ..core.data.folders import (
    PairMaker,
    SliceDataset,
    list_images,
    load_paired,
    make_pairs,
    shard,
    split_holdout,
)
from ..core.data.template import fixed_test_pairs, load_template, template_estimate
from ..core.files import imagefiles
from ..core.learning.distributed import DistContext
from ..core.memory import check_memory
from .base import Messages, PathLike, SettingError, report_bad


@dataclass(frozen=True, eq=False)
class ArrayTargets:
    """Ready-made target pairs as arrays: ``fixed`` and ``moving`` of shape (N, H, W)
    (or one (H, W) pair), used as they are. A run with them can save a state, but
    resuming it needs the arrays again.

    ``registered`` names the registered pairs the arrays were cut from, as
    ``(fixed, moving, affine)`` (the images and :attr:`RegistrationResult.affine`): a
    fresh run then registers them again with the weights it would keep and with its
    starting weights (:func:`~napari_discreg.core.registration.register.network_stage_distance`)
    and keeps the start unless the pairs match better, so an adaptation to the user's own
    pair never leaves a model that registers that pair worse by the pipeline's own
    label-free measure."""

    fixed: np.ndarray
    moving: np.ndarray
    description: str | None = None
    registered: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = ()


@dataclass(frozen=True)
class PairFiles:
    """Ready-made target pairs: ``fixed`` and ``moving`` each a stack/volume file or a
    folder of 2D images (paired in sorted order), used as they are."""

    fixed: PathLike
    moving: PathLike

    def options(self) -> TargetOptions:
        return TargetOptions(target_fixed=self.fixed, target_moving=self.moving)


@dataclass(frozen=True)
class FolderTargets:
    """Target pairs made with a synthetic deformation from folders (or files) of images.

    Without ``moving``, ``paths`` hold the moving contrast and the fixed slices come
    from the spec's ``source``; with it, ``paths`` hold the fixed contrast and
    ``moving`` the moving one. Folders with equal file counts are paired subject by
    subject (then the deformation is known and a held-out evaluation runs at the end);
    others, or ``unpaired``, are paired at random at the same relative slice position.
    """

    paths: PathLike | Sequence[PathLike]
    moving: PathLike | None = None
    unpaired: bool = False

    def options(self) -> TargetOptions:
        return TargetOptions(target=self.paths, target_moving=self.moving, unpaired=self.unpaired)


@dataclass(frozen=True)
class DemoTargets:
    """``n`` built-in T1 (fixed) vs T2-like (moving) pairs of the MNI template."""

    n: int

    def options(self) -> TargetOptions:
        return TargetOptions(demo_target=self.n)


@dataclass(frozen=True)
class TargetOptions:
    """The targets as ``napari-discreg adapt`` options give them: any combination,
    checked (with the command line's messages) when the run is resolved. When
    resuming, the fields left unset come from the saved run, and the paths given
    replace the saved ones (the data may have moved)."""

    target: PathLike | Sequence[PathLike] | None = None
    target_fixed: PathLike | None = None
    target_moving: PathLike | None = None
    unpaired: bool = False
    demo_target: int | None = None

    def options(self) -> TargetOptions:
        return self


Targets = ArrayTargets | PairFiles | FolderTargets | DemoTargets | TargetOptions


def check_target_options(options: TargetOptions, source) -> None:
    """Refuse a combination of target options that names no targets, or two kinds."""
    t = options
    if t.demo_target is not None and (t.target_fixed or t.target_moving or t.target):
        raise SettingError(
            "give either {demo_target} or {target_fixed}/{target_moving} (or {target}), not both"
        )
    if t.target and t.target_fixed:
        raise SettingError(
            "give either {target} (folders: pairs made with a synthetic deformation) or "
            "{target_fixed}/{target_moving} (ready-made pairs), not both"
        )
    if t.target:
        if not (t.target_moving or source):
            raise SettingError(
                "{target} holds the moving contrast; give the fixed contrast with {source} "
                "(or give {target} FIXED {target_moving} MOVING)"
            )
        return
    if t.demo_target is None and not (t.target_fixed and t.target_moving):
        raise SettingError(
            "give {target_fixed} and {target_moving} (or {demo_target} N, or {target} with "
            "{source})"
        )


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return (
        path.is_file() and not name.startswith(".") and name.endswith(imagefiles.IMAGE_EXTENSIONS)
    )


def read_targets(path: PathLike, *, axis: int | None = None) -> tuple[np.ndarray, str]:
    """(N, H, W) images from a stack/volume file or a folder of 2D images (sorted by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if _is_image_file(f))
        if not files:
            raise ValueError(
                f"{p}: the folder holds no images ({', '.join(imagefiles.IMAGE_EXTENSIONS)})"
            )
        images = [imagefiles.read_image(f, axis=axis) for f in files]
        for f, image in zip(files, images, strict=True):
            if image.shape != images[0].shape:
                raise ValueError(
                    f"{p}: the images differ in shape ({files[0].name} is {images[0].shape}, "
                    f"{f.name} is {image.shape}); all target images must have one shape"
                )
        return np.stack(images), f"{len(files)} images in {p}"
    stack = imagefiles.read_stack(p, axis=axis)
    return stack, f"{stack.shape[0]} slices of {p}"


def _check_pairs(fixed: np.ndarray, moving: np.ndarray) -> None:
    if fixed.shape[0] != moving.shape[0]:
        raise SettingError(
            f"{{target_fixed}} has {fixed.shape[0]} images but {{target_moving}} has "
            f"{moving.shape[0]}; pairs are matched in order, so the counts must be equal"
        )
    if fixed.shape != moving.shape:
        raise ValueError(
            f"target fixed images are {fixed.shape[1]} x {fixed.shape[2]} but moving images "
            f"are {moving.shape[1]} x {moving.shape[2]}; they must have one shape"
        )


@dataclass(frozen=True)
class _Reading:
    """How folder targets are read and shared out."""

    data_config: DataConfig
    folder_config: FolderConfig
    seed: int
    skip_bad: bool
    allow_mixed_shapes: bool
    ctx: DistContext
    say: Messages


def _folder_targets(opts: TargetOptions, source, reading: _Reading) -> dict[str, Any]:
    """Target pool (this rank's shard), evaluation pairs and held-out slices from folders."""
    dcfg, fcfg, seed = reading.data_config, reading.folder_config, reading.seed
    ctx, say = reading.ctx, reading.say
    fixed_src: Any
    moving_src: Any
    if opts.target_moving:
        fixed_src, moving_src = opts.target, [opts.target_moving]
        names = ("fixed (--target)", "moving (--target-moving)")
    else:
        fixed_src, moving_src = source, opts.target
        names = ("fixed (--source)", "moving (--target)")
    pairing, note = ("unpaired", "--unpaired was given") if opts.unpaired else ("paired", "")
    if not opts.unpaired:
        n_fixed = len(list_images(fixed_src, name=names[0]))
        n_moving = len(list_images(moving_src, name=names[1]))
        if n_fixed != n_moving:
            pairing = "unpaired"
            note = (
                f"{names[0]} has {n_fixed} files and {names[1]} {n_moving}: they cannot be "
                "matched subject by subject"
            )
    common: dict[str, Any] = {
        "size": dcfg.size,
        "config": fcfg,
        "skip_bad": reading.skip_bad,
        "allow_mixed_shapes": reading.allow_mixed_shapes,
    }
    if pairing == "paired":
        ds_f, ds_m = load_paired(fixed_src, moving_src, names=names, **common)
        report_bad(ds_f.bad + [b for b in ds_m.bad if b not in ds_f.bad], say)
        train_idx, val_idx, how = split_holdout(ds_f, fcfg.val_fraction, seed)
    else:
        ds_f = SliceDataset.from_paths(fixed_src, name=names[0], **common)
        ds_m = SliceDataset.from_paths(moving_src, name=names[1], **common)
        report_bad(ds_f.bad + ds_m.bad, say)
        train_idx, val_idx = np.arange(len(ds_f)), np.zeros(0, dtype=np.int64)
        how = "unpaired target: no ground truth, so no evaluation"
    maker = PairMaker(ds_f, ds_m, pairing=pairing, config=dcfg)
    say.info(f"{ds_f.describe()}; {ds_m.describe()}")
    say.info(f"target pairs: {maker.describe()}" + (f" ({note})" if note else ""))
    say.info(f"  {how}")
    per_rank = -(-fcfg.target_pairs // ctx.world_size)
    pool = make_pairs(
        maker, shard(train_idx, ctx.rank, ctx.world_size), per_rank, seed=seed, stream=(0, ctx.rank)
    )
    evaluation_pairs = None
    if val_idx.size and fcfg.eval_pairs:
        evaluation_pairs = make_pairs(maker, val_idx, fcfg.eval_pairs, seed=seed, stream=(1,))
    # what the labelled source must not see: the held-out subjects' slices (paired only:
    # the two datasets are then index-aligned)
    held_files: set[Path] = set()
    held_slices: set[tuple[Path, int]] = set()
    for ds in (ds_f, ds_m) if pairing == "paired" else ():
        only_held = set(ds.file_index[val_idx].tolist()) - set(ds.file_index[train_idx].tolist())
        held_files |= {ds.files[f] for f in only_held}
        held_slices |= {(ds.files[ds.file_index[i]], int(ds.slice_index[i])) for i in val_idx}
    return {
        "fixed": pool.fixed,
        "moving": pool.moving,
        "description": f"{ds_f.describe()}; {ds_m.describe()}; {maker.describe()}",
        "pairing": pairing,
        "pairing_note": note,
        "held_out": how,
        "evaluation_pairs": evaluation_pairs,
        "held_files": held_files,
        "held_slices": held_slices,
        "skipped": [str(b) for b in ds_f.bad + ds_m.bad],
    }


def load_targets(
    targets: Targets,
    *,
    source,
    data_config: DataConfig,
    folder_config: FolderConfig,
    seed: int,
    skip_bad: bool,
    allow_mixed_shapes: bool,
    ctx: DistContext,
    say: Messages,
    max_memory_gb: float | None = None,
) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """(fixed, moving, description, folder info) of checked ``targets`` (arrays, or
    :class:`TargetOptions` that :func:`check_target_options` accepted). The folder
    info (this rank's pool, evaluation pairs, pairing, held-out files) is empty unless
    the targets come from folders; ``source`` gives their fixed contrast without
    ``target_moving``."""
    t, size = targets, data_config.size
    if isinstance(t, ArrayTargets):
        fixed, moving = np.asarray(t.fixed), np.asarray(t.moving)
        if fixed.ndim == 2 and moving.ndim == 2:
            fixed, moving = fixed[None], moving[None]
        _check_pairs(fixed, moving)
        return fixed, moving, t.description or f"{fixed.shape[0]} pairs given as arrays", {}
    t = t.options()
    if t.demo_target is not None:
        check_memory(
            template_estimate(size, t.demo_target),
            limit_gb=max_memory_gb,
            hint="use fewer built-in pairs or a smaller size",
        )
        pairs = fixed_test_pairs(
            load_template(size, max_memory_gb=max_memory_gb),
            data_config,
            n=t.demo_target,
            fixed_contrast="t1",
            moving_contrast="t2",
            seed=seed,
        )
        fixed = np.stack([p.fixed for p in pairs])
        moving = np.stack([p.moving for p in pairs])
        return (
            fixed,
            moving,
            f"{len(pairs)} built-in T1 (fixed) vs T2-like (moving) pairs, {size} px, seed {seed}",
            {},
        )
    if t.target:
        reading = _Reading(data_config, folder_config, seed, skip_bad, allow_mixed_shapes, ctx, say)
        folder = _folder_targets(t, source, reading)
        return folder["fixed"], folder["moving"], folder["description"], folder
    axis = folder_config.axis
    fixed, desc_f = read_targets(t.target_fixed, axis=axis)  # type: ignore[arg-type]
    moving, desc_m = read_targets(t.target_moving, axis=axis)  # type: ignore[arg-type]
    _check_pairs(fixed, moving)
    return fixed, moving, f"fixed: {desc_f}; moving: {desc_m}", {}
