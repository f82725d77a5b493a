"""``napari-discreg train``: source training on the template or the user's folders,
resumable, data-parallel under torchrun. The run itself is
:func:`napari_discreg.runs.run_training`; this module parses the options, shows the
progress and saves the model."""

from __future__ import annotations

from pathlib import Path

from ..core.config import DataConfig, FolderConfig, ModelConfig, TrainConfig
from ..core.data.template import CONTRASTS
from ..core.learning.distributed import DistContext, init_distributed
from ..runs import TrainingSpec, run_training
from ._common import (
    EXIT_INTERRUPTED,
    PROG,
    _add_dist_timeout,
    _add_folder_options,
    _device_arg,
    _evaluation_text,
    _positive_float,
    _positive_int,
    _progress,
    _say,
    _state_path,
    _warn,
    add_memory_option,
    check_model_output,
    run_distributed,
    save_run_model,
)


def _add_train(sub) -> None:
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
    _add_dist_timeout(p)
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
    add_memory_option(p)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    out = check_model_output(Path(args.output), {"--source": args.source}, resume=args.resume)
    ctx = init_distributed(args.device, timeout_s=args.dist_timeout)
    return run_distributed(ctx, lambda: _train(_train_spec(args, out, ctx), out, ctx))


def _train_spec(args, out: Path, ctx: DistContext) -> TrainingSpec:
    """The run the options describe; with --resume the architecture, settings and data
    come from the saved run (the run resolves them): an option given that contradicts
    it is refused there, the data options may change (the files may have moved)."""
    common = {
        "source": args.source,
        "skip_bad": args.skip_bad,
        "allow_mixed_shapes": args.allow_mixed_shapes,
        "workers": args.workers,
        "context": ctx,
        "checkpoint_every": args.checkpoint_every,
        "state_path": _state_path(out),
        "resume": args.resume,
        "command": args.command_line,
        "log": _say,
        "warn": _warn,
        "max_memory_gb": args.max_memory_gb,
    }
    contrasts = tuple(c.strip().lower() for c in args.contrasts.split(",") if c.strip())
    bad = [c for c in contrasts if c not in CONTRASTS]
    if bad or not contrasts:
        raise ValueError(
            f"--contrasts must list some of {', '.join(CONTRASTS)}, got {args.contrasts!r}"
        )
    return TrainingSpec(
        model_config=ModelConfig(
            num_labels=args.num_labels,
            capture_range=args.capture_range,
            stride=args.stride,
            features=args.features,
            head_channels=args.head_channels,
        ),
        config=TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            source_contrasts=contrasts,
            seed=args.seed,
        ),
        data_config=DataConfig(size=args.size),
        folder_config=FolderConfig(
            axis=args.axis,
            min_foreground=args.min_foreground,
            val_fraction=args.val_fraction,
            eval_pairs=args.eval_pairs,
        ),
        **common,
    )


def _train(spec: TrainingSpec, out: Path, ctx: DistContext) -> int:
    run = run_training(spec)
    bar = _progress(run.total, "train", initial=run.start_step, disable=not ctx.is_main)
    try:
        for progress in run:
            logs = progress.losses
            bar.update(1)
            bar.set_postfix(
                loss=f"{logs['loss']:.3f}", acc=f"{logs['accuracy']:.1%}", refresh=False
            )
    except KeyboardInterrupt:
        run.close()  # stops after the step and saves the state
    finally:
        bar.close()
    result = run.result
    if result is None:  # interrupted before the first step began
        raise KeyboardInterrupt

    saved = save_run_model(
        result.model, out, result.metadata, interrupted=result.interrupted, ctx=ctx
    )
    if not ctx.is_main:
        return EXIT_INTERRUPTED if result.interrupted else 0
    completed, total, state_path = result.completed_steps, result.total_steps, result.state_path
    if result.interrupted:
        _say(
            f"interrupted after {completed} of {total} steps; saved the model trained so far to "
            f"{saved}" + (f" (the complete model at {out} was kept)" if saved != out else "")
        )
        if state_path is not None and result.state_error is None:
            _say(f"resume with: {PROG} train --resume {state_path} -o {out}")
        if result.state_error is not None:
            raise OSError(f"the training state was not saved: {result.state_error}")
        return EXIT_INTERRUPTED
    if result.state_error is not None:
        _say(f"saved {out}")
        raise OSError(
            f"the model was saved to {out} but the training state was not: {result.state_error}"
        )
    last = result.losses
    acc = last.get("accuracy", float("nan"))
    ran = completed - result.start_step
    if ran == 0:
        _say(f"nothing left to train (all {total} steps were done); saved {out}")
    else:
        _say(
            f"trained {ran} steps in {result.runtime_s:.1f} s (last loss {last.get('loss', float('nan')):.3f}, "
            f"label accuracy {acc:.1%}); saved {out}"
        )
    if result.weight_difference is not None:
        _say(
            f"  {ctx.world_size} processes ended with identical weights: "
            f"{result.weight_difference == 0.0}"
        )
    if result.evaluation:
        _say(f"  {_evaluation_text(result.evaluation)}")
    if run.spec.checkpoint_every:
        _say(f"  training state: {state_path}")
    return 0
