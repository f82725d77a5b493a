"""``napari-discreg adapt``: MCD adaptation to unlabelled target pairs, resumable,
data-parallel under torchrun."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core import io
from ..core.discrepancy import Discrepancy
from ._common import (
    EXIT_INTERRUPTED,
    PROG,
    SHIPPED_NAMES,
    _add_folder_options,
    _device_arg,
    _jsonable,
    _load_folder,
    _load_model,
    _make_dirs,
    _positive_float,
    _positive_int,
    _progress,
    _report_bad,
    _save_model,
    _say,
    _state_path,
    check_writable_file,
)


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(io.IMAGE_EXTENSIONS)


def read_targets(path: str | os.PathLike, *, axis: int | None = None) -> tuple[np.ndarray, str]:
    """(N, H, W) images from a stack/volume file or a folder of 2D images (sorted by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if _is_image_file(f))
        if not files:
            raise ValueError(f"{p}: the folder holds no images ({', '.join(io.IMAGE_EXTENSIONS)})")
        images = [io.read_image(f, axis=axis) for f in files]
        for f, image in zip(files, images, strict=True):
            if image.shape != images[0].shape:
                raise ValueError(
                    f"{p}: the images differ in shape ({files[0].name} is {images[0].shape}, "
                    f"{f.name} is {image.shape}); all target images must have one shape"
                )
        return np.stack(images), f"{len(files)} images in {p}"
    stack = io.read_stack(p, axis=axis)
    return stack, f"{stack.shape[0]} slices of {p}"


def _add_adapt(sub) -> None:
    from ..core.config import AdaptConfig, DataConfig, FolderConfig

    a, d, f = AdaptConfig(), DataConfig(), FolderConfig()
    p = sub.add_parser(
        "adapt",
        help="adapt a model to a new contrast pair without labels (MCD)",
        description=(
            "Unsupervised domain adaptation by maximum classifier discrepancy on "
            "unlabelled target pairs. Target pairs come from one of: --target DIR, a "
            "folder (or files) of a second contrast, whose slices are the moving images "
            "against fixed slices of --source (or of --target when --target-moving DIR "
            "gives the second contrast), with a synthetic deformation between them; "
            "folders with equal file counts are paired subject by subject in sorted "
            "order (then the deformation is known and a held-out evaluation runs at the "
            "end), others (or --unpaired) are paired at random at the same relative "
            "slice position; --target-fixed and --target-moving, ready-made pairs (each "
            "a stack/volume file or a folder of 2D images, paired in sorted order, used "
            "as they are); or --demo-target N built-in T1 (fixed) vs T2-like (moving) "
            "pairs. The labelled source pairs are mono-modal pairs of --source DIR, or "
            "of the MNI template. The weights with the best unsupervised criterion "
            "(MIND-SSC similarity of fixed vs warped target) are kept, so more steps never give a worse "
            "model by that measure. Runs under torchrun (docs/scaling.md)."
        ),
    )
    p.add_argument(
        "-o", "--output", required=True, help="adapted checkpoint to write (.safetensors)"
    )
    p.add_argument(
        "--model",
        help="checkpoint to adapt, or a shipped model by name ("
        + SHIPPED_NAMES
        + "); default: default",
    )
    p.add_argument(
        "--source",
        nargs="+",
        metavar="PATH",
        help="labelled source images (one contrast, folders/files); default: the MNI template",
    )
    p.add_argument(
        "--target",
        nargs="+",
        metavar="PATH",
        help="target images (folders/files) of the second contrast (moving, fixed from "
        "--source), or of the fixed contrast when --target-moving is given too",
    )
    p.add_argument("--target-fixed", help="fixed target images: stack/volume file or folder")
    p.add_argument(
        "--target-moving",
        help="moving target images: stack/volume file or folder (with --target-fixed), or "
        "the moving contrast's folder (with --target)",
    )
    p.add_argument(
        "--unpaired",
        action="store_true",
        help="the --target folders are not the same subjects as the fixed contrast's: pair "
        "slices at random (no ground truth, no evaluation)",
    )
    p.add_argument(
        "--target-pairs",
        type=_positive_int,
        default=f.target_pairs,
        help=f"unlabelled target pairs made from --target folders (default {f.target_pairs})",
    )
    p.add_argument(
        "--demo-target", type=_positive_int, metavar="N", help="use N built-in T1 vs T2-like pairs"
    )
    p.add_argument(
        "--discrepancy",
        choices=[kind.value for kind in Discrepancy],
        default="pemd",
        help="default pemd; pemd16+ is the paper's p-EMD (16+)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=f"MCD iterations in all (default {a.steps}; with --resume: the saved run's, or "
        "more to extend it)",
    )
    p.add_argument(
        "--lr", type=_positive_float, default=a.lr, help=f"learning rate (default {a.lr:g})"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=a.batch_size,
        help=f"pairs per step and process (default {a.batch_size})",
    )
    p.add_argument("--seed", type=int, default=a.seed, help=f"random seed (default {a.seed})")
    p.add_argument(
        "--size",
        type=_positive_int,
        default=d.size,
        help=f"px of source/target slices and of --demo-target pairs (default {d.size})",
    )
    p.add_argument(
        "--axis",
        type=int,
        help="slice axis of volumes (default 0 for TIFF/.npy; 2 for NIfTI)",
    )
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu or cuda")
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="N",
        help="every N iterations (and at the end) write a resumable adaptation state (current "
        "and best weights, both optimisers, step) to OUTPUT's name with .state.safetensors",
    )
    p.add_argument(
        "--resume",
        metavar="STATE",
        help="continue the run saved in STATE (a .state.safetensors file): targets, source, "
        "model and settings come from it (--source/--target... may give the data's new "
        "place; --steps may extend the run)",
    )
    _add_folder_options(p, axis=False)
    p.set_defaults(func=_run_adapt)
    p.set_defaults(adapt_defaults={x.dest: x.default for x in p._actions})


def _check_target_args(args) -> None:
    if args.demo_target is not None and (args.target_fixed or args.target_moving or args.target):
        raise ValueError(
            "give either --demo-target or --target-fixed/--target-moving (or --target), not both"
        )
    if args.target and args.target_fixed:
        raise ValueError(
            "give either --target (folders: pairs made with a synthetic deformation) or "
            "--target-fixed/--target-moving (ready-made pairs), not both"
        )
    if args.target:
        if not (args.target_moving or args.source):
            raise ValueError(
                "--target holds the moving contrast; give the fixed contrast with --source "
                "(or give --target FIXED --target-moving MOVING)"
            )
        return
    if args.demo_target is None and not (args.target_fixed and args.target_moving):
        raise ValueError(
            "give --target-fixed and --target-moving (or --demo-target N, or --target with "
            "--source)"
        )


def _run_adapt(args) -> int:
    from ..core.distributed import init_distributed, shutdown

    out = check_writable_file(args.output)
    if args.resume:
        _resume_settings(args)
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    _check_target_args(args)
    ctx = init_distributed(args.device)
    try:
        return _adapt(args, out, ctx)
    finally:
        shutdown(ctx)


RUN_KEYS = (
    "model",
    "source",
    "target",
    "target_fixed",
    "target_moving",
    "unpaired",
    "target_pairs",
    "demo_target",
    "discrepancy",
    "lr",
    "batch_size",
    "seed",
    "size",
    "axis",
    "skip_bad",
    "allow_mixed_shapes",
    "min_foreground",
    "val_fraction",
    "eval_pairs",
    "checkpoint_every",
)
"""The ``adapt`` options a resumable state records and ``--resume`` restores."""
_DATA_KEYS = ("source", "target", "target_fixed", "target_moving")
_PATH_KEYS = ("model", *_DATA_KEYS)


def _adapt_run_settings(args) -> dict[str, Any]:
    """The run's options (paths made absolute), as recorded in its state file."""

    def absolute(value):
        if value is None:
            return None
        if isinstance(value, list):
            return [str(Path(v).resolve()) for v in value]
        return str(Path(value).resolve())

    return {
        k: absolute(getattr(args, k)) if k in _PATH_KEYS else getattr(args, k) for k in RUN_KEYS
    }


def _resume_settings(args) -> None:
    """Fill ``args`` from the state given with --resume; an option given on the command
    line that contradicts the saved run is an error (the run would not be the same)."""
    from ..core.checkpoint import read_checkpoint

    _, _, extra = read_checkpoint(args.resume)
    saved = extra.get("adaptation_run")
    if not isinstance(saved, dict) or "adaptation_state" not in extra:
        raise ValueError(
            f"{args.resume}: holds no adaptation run to resume; give the *.state.safetensors "
            f"file that `{PROG} adapt --checkpoint-every N` writes"
        )
    defaults = args.adapt_defaults
    given = _adapt_run_settings(args)
    for key in RUN_KEYS:
        value = saved.get(key, defaults.get(key))
        if key in ("checkpoint_every", *_DATA_KEYS) and getattr(args, key):
            continue  # may change (the data may have moved)
        if getattr(args, key) != defaults.get(key) and given[key] != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"{flag} differs from the run saved in {args.resume} ({value!r}); leave it out "
                "when resuming"
            )
        setattr(args, key, value)
    if args.steps is None:
        args.steps = int(saved.get("steps", 0))
    done = int(extra["adaptation_state"].get("step", 0))
    if args.steps < done:
        raise ValueError(
            f"{args.resume} is at iteration {done}; --steps must be at least that (it counts "
            "the iterations of the whole run)"
        )


def _folder_targets(args, dcfg, fcfg, seed: int, ctx) -> dict[str, Any]:
    """Target pool (this rank's shard), evaluation pairs and held-out slices from --target."""
    from ..core.dataset import (
        PairMaker,
        SliceDataset,
        list_images,
        load_paired,
        make_pairs,
        shard,
        split_holdout,
    )

    if args.target_moving:
        fixed_src, moving_src = args.target, [args.target_moving]
        names = ("fixed (--target)", "moving (--target-moving)")
    else:
        fixed_src, moving_src = args.source, args.target
        names = ("fixed (--source)", "moving (--target)")
    pairing, note = ("unpaired", "--unpaired was given") if args.unpaired else ("paired", "")
    if not args.unpaired:
        n_fixed = len(list_images(fixed_src, name=names[0]))
        n_moving = len(list_images(moving_src, name=names[1]))
        if n_fixed != n_moving:
            pairing = "unpaired"
            note = (
                f"{names[0]} has {n_fixed} files and {names[1]} {n_moving}: they cannot be "
                "matched subject by subject"
            )
    common = {
        "size": dcfg.size,
        "config": fcfg,
        "skip_bad": args.skip_bad,
        "allow_mixed_shapes": args.allow_mixed_shapes,
    }
    if pairing == "paired":
        ds_f, ds_m = load_paired(fixed_src, moving_src, names=names, **common)
        _report_bad(ds_f.bad + [b for b in ds_m.bad if b not in ds_f.bad], ctx)
        train_idx, val_idx, how = split_holdout(ds_f, fcfg.val_fraction, seed)
    else:
        ds_f = SliceDataset.from_paths(fixed_src, name=names[0], **common)
        ds_m = SliceDataset.from_paths(moving_src, name=names[1], **common)
        _report_bad(ds_f.bad + ds_m.bad, ctx)
        train_idx, val_idx = np.arange(len(ds_f)), np.zeros(0, dtype=np.int64)
        how = "unpaired target: no ground truth, so no evaluation"
    maker = PairMaker(ds_f, ds_m, pairing=pairing, config=dcfg)
    if ctx.is_main:
        _say(f"{ds_f.describe()}; {ds_m.describe()}")
        _say(f"target pairs: {maker.describe()}" + (f" ({note})" if note else ""))
        _say(f"  {how}")
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


def _adapt(args, out: Path, ctx) -> int:
    from .. import adapt_steps
    from ..core.checkpoint import checkpoint_info, load_adaptation_state, save_adaptation_state
    from ..core.config import AdaptConfig, DataConfig, FolderConfig, TrainConfig
    from ..core.dataset import PairBatches, PairMaker, evaluate_pairs
    from ..core.distributed import (
        average_gradients,
        barrier,
        broadcast_module,
        max_weight_difference,
    )
    from ..core.train import AdaptState, source_batches

    dcfg = DataConfig(size=args.size)
    fcfg = FolderConfig(
        axis=args.axis,
        min_foreground=args.min_foreground,
        val_fraction=args.val_fraction,
        eval_pairs=args.eval_pairs,
        target_pairs=args.target_pairs,
    )
    steps_total = AdaptConfig.steps if args.steps is None else args.steps
    cfg = AdaptConfig(steps=steps_total, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    folder: dict[str, Any] = {}
    if args.demo_target is not None:
        from ..core.data import fixed_test_pairs, load_template

        pairs = fixed_test_pairs(
            load_template(args.size),
            dcfg,
            n=args.demo_target,
            fixed_contrast="t1",
            moving_contrast="t2",
            seed=args.seed,
        )
        fixed = np.stack([p.fixed for p in pairs])
        moving = np.stack([p.moving for p in pairs])
        target = f"{len(pairs)} built-in T1 (fixed) vs T2-like (moving) pairs, {args.size} px, seed {args.seed}"
    elif args.target:
        folder = _folder_targets(args, dcfg, fcfg, args.seed, ctx)
        fixed, moving, target = folder["fixed"], folder["moving"], folder["description"]
    else:
        fixed, desc_f = read_targets(args.target_fixed, axis=args.axis)
        moving, desc_m = read_targets(args.target_moving, axis=args.axis)
        if fixed.shape[0] != moving.shape[0]:
            raise ValueError(
                f"--target-fixed has {fixed.shape[0]} images but --target-moving has "
                f"{moving.shape[0]}; pairs are matched in order, so the counts must be equal"
            )
        if fixed.shape != moving.shape:
            raise ValueError(
                f"target fixed images are {fixed.shape[1]} x {fixed.shape[2]} but moving images "
                f"are {moving.shape[1]} x {moving.shape[2]}; they must have one shape"
            )
        target = f"fixed: {desc_f}; moving: {desc_m}"
    total_pairs = int(fixed.shape[0]) * (ctx.world_size if folder else 1)
    if ctx.distributed and not folder and fixed.shape[0] >= ctx.world_size:
        fixed, moving = fixed[ctx.rank :: ctx.world_size], moving[ctx.rank :: ctx.world_size]

    eval_pairs = folder.get("evaluation_pairs")
    state = AdaptState()
    criteria: dict[int, float] = {}
    if args.resume:
        model, state, saved = load_adaptation_state(args.resume, cfg.lr, ctx.device)
        record = saved.get("adaptation", {})
        model_desc, base_info = record.get("base_model"), saved.get("base_model_info", {})
        before = record.get("evaluation_before") if ctx.is_main else None
        if record.get("initial_criterion") is not None:
            criteria[0] = record["initial_criterion"]
        criteria[state.best_iteration] = float(state.best_score)
        if ctx.is_main:
            _say(f"resuming {args.resume} after iteration {state.step} of {cfg.steps}")
    else:
        model, model_desc = _load_model(args.model, ctx.device)
        base_info = checkpoint_info(args.model)
        base_info.pop("model_config", None)
        before = (
            evaluate_pairs(model, eval_pairs) if ctx.is_main and eval_pairs is not None else None
        )
    start_step = state.step

    source_desc = "MNI template, T1/T2-like/PD-like mono-modal pairs"
    source = None
    if args.source:
        src = _load_folder(
            args.source, name="source", args=args, size=dcfg.size, folder_cfg=fcfg, ctx=ctx
        )
        held_f, held_s = folder.get("held_files", set()), folder.get("held_slices", set())
        keep = [
            i
            for i in range(len(src))
            if src.files[src.file_index[i]] not in held_f
            and (src.files[src.file_index[i]], int(src.slice_index[i])) not in held_s
        ]
        if not keep:
            raise ValueError(
                "every source slice belongs to the held-out target subjects; give more files "
                "or --val-fraction 0"
            )
        source = PairBatches(
            PairMaker(src, config=dcfg),
            keep,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
        ).iterate(start_step, device=ctx.device, workers=args.workers)
        source_desc = f"{src.describe()} ({len(keep)} slices used), mono-modal pairs"
    elif ctx.distributed:
        rng = np.random.default_rng([cfg.seed, ctx.rank, start_step])
        source = source_batches(
            dcfg,
            cfg.batch_size,
            TrainConfig.source_contrasts,
            rng,
            ctx.device,
            augment=cfg.source_augmentation,
        )
    broadcast_module(model, ctx)

    steps = adapt_steps(
        model,
        fixed,
        moving,
        discrepancy=args.discrepancy,
        config=cfg,
        data_config=dcfg,
        source=source,
        device=ctx.device,
        state=state,
    )
    every = args.checkpoint_every
    state_path = _state_path(out)
    bar = _progress(
        cfg.steps, f"adapt ({args.discrepancy})", initial=start_step, disable=not ctx.is_main
    )
    completed, best_iter, interrupted, diverged = start_step, state.best_iteration, False, None
    start = time.perf_counter()

    def record_extra(elapsed: float, evaluation: dict | None = None) -> dict[str, Any]:
        return {
            "adaptation": {
                "discrepancy": args.discrepancy,
                "steps": cfg.steps,
                "completed_steps": completed,
                "best_iteration": best_iter,
                "selection_criterion": cfg.criterion,
                "initial_criterion": criteria.get(0),
                "best_criterion": criteria.get(best_iter),
                "config": cfg.to_dict(),
                "data_config": dcfg.to_dict(),
                "folder_config": fcfg.to_dict() if (folder or args.source) else None,
                "target": target,
                "target_pairs": total_pairs,
                "pairing": folder.get("pairing"),
                "pairing_note": folder.get("pairing_note") or None,
                "skipped": folder.get("skipped", []),
                "source": source_desc,
                "evaluation": evaluation,
                "evaluation_before": before,
                "base_model": model_desc,
                "resumed_from": str(args.resume) if args.resume else None,
                "interrupted": interrupted,
                "diverged": diverged,
                "device": str(ctx.device),
                "distributed": {
                    "world_size": ctx.world_size,
                    "backend": ctx.backend,
                    "max_weight_difference": sync,
                },
                "runtime_s": elapsed,
            },
            "base_model_info": base_info,
            "command": args.command_line,
            "napari_discreg_version": __version__,
        }

    def save_state(running: bool) -> bool:
        """Write the resumable state (main process); False if the run cannot be resumed."""
        if not ctx.is_main or not (every or args.resume):
            return False
        if not running and state.weights is None:
            return False
        _make_dirs(state_path.parent)
        extra = record_extra(time.perf_counter() - start)
        extra["adaptation_run"] = {**_adapt_run_settings(args), "steps": cfg.steps}
        save_adaptation_state(state_path, model, state, _jsonable(extra), running=running)
        return True

    sync = None
    try:
        with average_gradients(model, ctx):
            for record in steps:
                if record.criterion is not None:
                    criteria[record.iteration] = record.criterion
                if record.best_iteration is not None:
                    best_iter = record.best_iteration
                if record.iteration == start_step:
                    continue
                completed = record.iteration
                if every and completed % every == 0 and completed < cfg.steps:
                    save_state(running=True)
                bar.update(1)
                postfix = {"disc": f"{record.discrepancy:.4f}"}
                if criteria:
                    postfix["crit"] = f"{criteria[max(criteria)]:.4f}"
                postfix["best"] = str(best_iter)
                bar.set_postfix(postfix, refresh=False)
    except KeyboardInterrupt:
        interrupted = True
        steps.close()  # restores the best weights seen
    except FloatingPointError as exc:
        diverged = str(exc)  # the generator has restored the best weights
    finally:
        bar.close()
    elapsed = time.perf_counter() - start

    if ctx.distributed and not (interrupted or diverged):
        # every rank kept the best weights by its own criterion: rank 0's choice wins
        broadcast_module(model, ctx)
        sync = max_weight_difference(model, ctx)
    evaluation = None
    if before is not None and eval_pairs is not None and not interrupted:
        after = evaluate_pairs(model, eval_pairs)
        evaluation = {
            "pairs": len(eval_pairs),
            "held_out": folder["held_out"],
            "identity": before["identity"],
            "before": before["model"],
            "after": after["model"],
        }
    extra = record_extra(elapsed, evaluation)
    saved_state = save_state(running=False)
    if ctx.is_main:
        _save_model(model, out, extra)
    if not (interrupted or diverged):
        barrier(ctx)
    if not ctx.is_main:
        return 1 if diverged else EXIT_INTERRUPTED if interrupted else 0
    resume_hint = ""
    if (every or args.resume) and state_path.is_file():
        resume_hint = f"resume with: {PROG} adapt --resume {state_path} -o {out}" + (
            "" if saved_state else " (from the last saved state)"
        )
    if diverged:
        print(f"{PROG}: warning: {diverged}", file=sys.stderr)
        _say(f"saved the best weights (iteration {best_iter}) to {out}")
        return 1
    if interrupted:
        _say(
            f"interrupted after {completed} of {cfg.steps} iterations; saved the best weights "
            f"seen to {out}"
        )
        if resume_hint:
            _say(resume_hint)
        return EXIT_INTERRUPTED
    init, best = criteria.get(0), criteria.get(best_iter)
    crit = f"{cfg.criterion} {init:.4f} -> {best:.4f}" if init is not None and best is not None else ""
    _say(
        f"adapted with {args.discrepancy} for {completed - start_step} iterations in "
        f"{elapsed:.1f} s ({completed} of {cfg.steps} in all); best iteration {best_iter} "
        f"({crit}); saved {out}"
    )
    if saved_state:
        _say(f"  adaptation state: {state_path} (continue with --resume and a larger --steps)")
    if sync is not None:
        _say(f"  {ctx.world_size} processes ended with identical weights: {sync == 0.0}")
    if evaluation:
        b, a, i = evaluation["before"], evaluation["after"], evaluation["identity"]
        _say(
            f"  held-out target evaluation ({evaluation['pairs']} pairs): label accuracy "
            f"{i['label_accuracy']:.1%} (identity) / {b['label_accuracy']:.1%} (before) -> "
            f"{a['label_accuracy']:.1%}; EPE {i['epe']:.3f} / {b['epe']:.3f} -> {a['epe']:.3f} px"
        )
    return 0
