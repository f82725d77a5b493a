"""``napari-discreg train``: source training on the template or the user's folders,
resumable, data-parallel under torchrun."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ._common import (
    EXIT_INTERRUPTED,
    PROG,
    _add_folder_options,
    _device_arg,
    _evaluation_text,
    _jsonable,
    _load_folder,
    _make_dirs,
    _positive_float,
    _positive_int,
    _progress,
    _save_model,
    _say,
    _state_path,
    check_writable_file,
)


def _add_train(sub) -> None:
    from ..core.config import DataConfig, ModelConfig, TrainConfig

    t, d, m = TrainConfig(), DataConfig(), ModelConfig()
    p = sub.add_parser(
        "train",
        help="train a model on synthetic mono-modal pairs (source domain)",
        description=(
            "Supervised source training of a new model on synthetic mono-modal pairs: "
            "from your own images with --source (folders/files of 2D images or 3D "
            "volumes, sliced along --axis), or else from the MNI template shipped with "
            "nilearn. Each pair is a slice and the same slice warped by a known smooth "
            "random deformation. With --checkpoint-every N a resumable training state "
            "(weights, optimiser, step) is written next to OUTPUT every N steps; "
            "--resume STATE continues from it. Runs under torchrun for data-parallel "
            "training on several processes/GPUs (docs/scaling.md). Ctrl-C stops early "
            "and saves the model trained so far."
        ),
    )
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--source",
        nargs="+",
        metavar="PATH",
        help="your images (folders and/or files, one contrast); default: the MNI template",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=t.steps, help=f"iterations (default {t.steps})"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=t.batch_size,
        help=f"pairs per step and process (default {t.batch_size})",
    )
    p.add_argument(
        "--lr", type=_positive_float, default=t.lr, help=f"peak learning rate (default {t.lr:g})"
    )
    p.add_argument("--seed", type=int, default=t.seed, help=f"random seed (default {t.seed})")
    p.add_argument(
        "--size", type=_positive_int, default=d.size, help=f"image size in px (default {d.size})"
    )
    p.add_argument(
        "--contrasts",
        default=",".join(t.source_contrasts),
        help=f"template contrasts, each paired with itself (default {','.join(t.source_contrasts)})",
    )
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu or cuda")
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="N",
        help="write a resumable training state (OUTPUT stem + .state.safetensors) every N "
        "steps, on Ctrl-C and at the end",
    )
    p.add_argument(
        "--resume",
        metavar="STATE",
        help="continue the run saved in STATE (a .state.safetensors file): architecture, "
        "settings and data come from it (--source may point to the data's new place)",
    )
    _add_folder_options(p, axis=True)
    arch = p.add_argument_group("architecture (defaults from ModelConfig)")
    arch.add_argument(
        "--num-labels", type=int, default=m.num_labels, help=f"K, odd (default {m.num_labels})"
    )
    arch.add_argument(
        "--capture-range",
        type=_positive_float,
        default=m.capture_range,
        help=f"q in px (default {m.capture_range:g})",
    )
    arch.add_argument(
        "--stride",
        type=_positive_int,
        default=m.stride,
        help=f"control-point spacing (default {m.stride})",
    )
    arch.add_argument(
        "--features",
        type=_positive_int,
        default=m.features,
        help=f"channels of G (default {m.features})",
    )
    arch.add_argument(
        "--head-channels",
        type=_positive_int,
        default=m.head_channels,
        help=f"channels of F1/F2 (default {m.head_channels})",
    )
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from ..core.distributed import init_distributed, shutdown

    out = check_writable_file(args.output)
    ctx = init_distributed(args.device)
    try:
        return _train(args, out, ctx)
    finally:
        shutdown(ctx)


def _train_settings(args):
    """(model config, train config, data config, folder config, run settings) from the
    command line, or from the training state given with --resume."""
    from ..core.checkpoint import read_checkpoint
    from ..core.config import DataConfig, FolderConfig, ModelConfig, TrainConfig
    from ..core.data import CONTRASTS

    if args.resume:
        mcfg, _, saved = read_checkpoint(args.resume)
        run = saved.get("training")
        if not isinstance(run, dict) or "folder_config" not in run:
            raise ValueError(
                f"{args.resume}: holds no training run to resume; give the "
                f"*.state.safetensors file that `{PROG} train --checkpoint-every N` writes"
            )
        names = TrainConfig.__dataclass_fields__
        tdict = {k: v for k, v in run.items() if k in names}
        tdict["source_contrasts"] = tuple(tdict.get("source_contrasts", ()))
        settings = {
            "source": args.source or run.get("source"),
            "checkpoint_every": args.checkpoint_every or run.get("checkpoint_every"),
            "skip_bad": args.skip_bad or bool(run.get("skip_bad")),
            "allow_mixed_shapes": args.allow_mixed_shapes or bool(run.get("allow_mixed_shapes")),
        }
        return (
            mcfg,
            TrainConfig(**tdict),
            DataConfig.from_dict(run["data_config"]),
            FolderConfig.from_dict(run["folder_config"]),
            settings,
        )
    contrasts = tuple(c.strip().lower() for c in args.contrasts.split(",") if c.strip())
    bad = [c for c in contrasts if c not in CONTRASTS]
    if bad or not contrasts:
        raise ValueError(
            f"--contrasts must list some of {', '.join(CONTRASTS)}, got {args.contrasts!r}"
        )
    mcfg = ModelConfig(
        num_labels=args.num_labels,
        capture_range=args.capture_range,
        stride=args.stride,
        features=args.features,
        head_channels=args.head_channels,
    )
    tcfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        source_contrasts=contrasts,
        seed=args.seed,
    )
    fcfg = FolderConfig(
        axis=args.axis,
        min_foreground=args.min_foreground,
        val_fraction=args.val_fraction,
        eval_pairs=args.eval_pairs,
    )
    settings = {
        "source": [str(Path(s).resolve()) for s in args.source] if args.source else None,
        "checkpoint_every": args.checkpoint_every,
        "skip_bad": args.skip_bad,
        "allow_mixed_shapes": args.allow_mixed_shapes,
    }
    return mcfg, tcfg, DataConfig(size=args.size), fcfg, settings


def _train(args, out: Path, ctx) -> int:
    import torch

    from ..core.checkpoint import load_training_state, save_training_state
    from ..core.dataset import PairBatches, PairMaker, evaluate_pairs, make_pairs, split_holdout
    from ..core.distributed import (
        all_reduce_mean,
        barrier,
        ddp_source_loss,
        max_weight_difference,
    )
    from ..core.model import DiscreteRegistrationNet
    from ..core.train import source_batches, train_steps

    mcfg, tcfg, dcfg, fcfg, settings = _train_settings(args)
    args.skip_bad, args.allow_mixed_shapes = settings["skip_bad"], settings["allow_mixed_shapes"]
    every = settings["checkpoint_every"]
    torch.manual_seed(tcfg.seed)  # reproducible initial weights (the same on every rank)
    model = DiscreteRegistrationNet(mcfg).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    start_step = 0
    if args.resume:
        start_step = load_training_state(args.resume, model, {"adam": opt}).step
        if ctx.is_main:
            _say(f"resuming {args.resume} after step {start_step} of {tcfg.steps}")

    source_info: dict[str, Any] = {"data": "MNI template (nilearn)"}
    maker, val_idx, batches = None, np.zeros(0, dtype=np.int64), None
    if settings["source"]:
        ds = _load_folder(
            settings["source"], name="source", args=args, size=dcfg.size, folder_cfg=fcfg, ctx=ctx
        )
        train_idx, val_idx, how = split_holdout(ds, fcfg.val_fraction, tcfg.seed)
        maker = PairMaker(ds, config=dcfg)
        batches = PairBatches(
            maker,
            train_idx,
            batch_size=tcfg.batch_size,
            seed=tcfg.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
        ).iterate(start_step, device=ctx.device, workers=args.workers)
        source_info = {
            "data": ds.describe(),
            "files": [str(f) for f in ds.used_files],
            "skipped": [str(b) for b in ds.bad],
            "training_slices": int(train_idx.size),
            "held_out": how,
        }
        if ctx.is_main:
            _say(f"  {how}")
    elif ctx.distributed or start_step:
        # a different template stream per rank, and a new one after a resume
        rng = np.random.default_rng([tcfg.seed, ctx.rank, start_step])
        batches = source_batches(dcfg, tcfg.batch_size, tcfg.source_contrasts, rng, ctx.device)
    if ctx.is_main and ctx.distributed:
        _say(
            f"data-parallel: {ctx.describe()}; {tcfg.batch_size} pairs per process and step "
            f"({tcfg.batch_size * ctx.world_size} in all)"
        )

    def record_extra(completed: int, interrupted: bool, elapsed: float) -> dict:
        return {
            "training": {
                **tcfg.to_dict(),
                "data_config": dcfg.to_dict(),
                "folder_config": fcfg.to_dict(),
                **settings,
                "source_data": source_info,
                "completed_steps": completed,
                "interrupted": interrupted,
                "final_loss": last.get("loss"),
                "final_accuracy": last.get("accuracy"),
                "loss_curve": _downsample(history),
                "device": str(ctx.device),
                "distributed": {
                    "world_size": ctx.world_size,
                    "backend": ctx.backend,
                    "pairs_per_step": tcfg.batch_size * ctx.world_size,
                    "max_weight_difference": sync,
                },
                "resumed_from": str(args.resume) if args.resume else None,
                "runtime_s": elapsed,
            },
            "command": args.command_line,
            "napari_discreg_version": __version__,
        }

    state_path = _state_path(out)

    def save_state(completed: int, interrupted: bool) -> None:
        if ctx.is_main and (every or args.resume):
            _make_dirs(state_path.parent)
            extra = _jsonable(record_extra(completed, interrupted, time.perf_counter() - start))
            save_training_state(state_path, model, {"adam": opt}, completed, extra)

    steps = train_steps(
        model,
        config=tcfg,
        data_config=dcfg,
        batches=batches,
        device=ctx.device,
        optimizer=opt,
        start_step=start_step,
        loss_fn=ddp_source_loss(model, ctx) if ctx.distributed else None,
    )
    bar = _progress(tcfg.steps, "train", initial=start_step, disable=not ctx.is_main)
    completed, last, interrupted = start_step, {}, False
    history: list[tuple[int, float]] = []
    sync: float | None = None
    start = time.perf_counter()
    try:
        for record in steps:
            logs = all_reduce_mean(record.losses, ctx)
            completed, last = record.iteration, logs
            history.append((completed, logs["loss"]))
            bar.update(1)
            bar.set_postfix(
                loss=f"{logs['loss']:.3f}", acc=f"{logs['accuracy']:.1%}", refresh=False
            )
            if every and completed % every == 0 and completed < tcfg.steps:
                save_state(completed, False)
    except KeyboardInterrupt:
        interrupted = True
        steps.close()
    finally:
        bar.close()
    model.eval()
    elapsed = time.perf_counter() - start

    evaluation = None
    if not interrupted:
        if ctx.distributed:
            sync = max_weight_difference(model, ctx)
        if ctx.is_main and maker is not None and val_idx.size and fcfg.eval_pairs:
            pairs = make_pairs(maker, val_idx, fcfg.eval_pairs, seed=tcfg.seed, stream=(1,))
            evaluation = {**evaluate_pairs(model, pairs), "pairs": len(pairs)}
    extra = record_extra(completed, interrupted, elapsed)
    extra["training"]["evaluation"] = evaluation
    if ctx.is_main:
        save_state(completed, interrupted)
        _save_model(model, out, extra)
    if not interrupted:
        barrier(ctx)
    if not ctx.is_main:
        return EXIT_INTERRUPTED if interrupted else 0
    if interrupted:
        _say(
            f"interrupted after {completed} of {tcfg.steps} steps; saved the model trained so far to {out}"
        )
        if every or args.resume:
            _say(f"resume with: {PROG} train --resume {state_path} -o {out}")
        return EXIT_INTERRUPTED
    acc = last.get("accuracy", float("nan"))
    ran = completed - start_step
    if ran == 0:
        _say(f"nothing left to train (all {tcfg.steps} steps were done); saved {out}")
    else:
        _say(
            f"trained {ran} steps in {elapsed:.1f} s (last loss {last.get('loss', float('nan')):.3f}, "
            f"label accuracy {acc:.1%}); saved {out}"
        )
    if sync is not None:
        _say(f"  {ctx.world_size} processes ended with identical weights: {sync == 0.0}")
    if evaluation:
        _say(f"  {_evaluation_text(evaluation)}")
    if every:
        _say(f"  training state: {state_path}")
    return 0


def _downsample(history: list[tuple[int, float]], points: int = 200) -> list[list[float]]:
    """At most ``points`` (step, loss) pairs, evenly spread, the last one included."""
    if len(history) <= points:
        return [[s, v] for s, v in history]
    idx = np.unique(np.linspace(0, len(history) - 1, points).round().astype(int))
    return [[history[i][0], history[i][1]] for i in idx]
