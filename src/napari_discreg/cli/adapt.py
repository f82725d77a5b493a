"""``napari-discreg adapt``: MCD adaptation to unlabelled target pairs, resumable,
data-parallel under torchrun. The run itself is :func:`napari_discreg.runs.run_adaptation`;
this module parses the options, shows the progress and saves the model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..core.config import ADAPT_METHODS, AdaptConfig, DataConfig, FolderConfig
from ..core.learning.discrepancy import Discrepancy
from ..core.learning.distributed import DistContext, init_distributed
from ..runs import AdaptationSpec, TargetOptions, resolve_adaptation, run_adaptation
from ._common import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    PROG,
    SHIPPED_NAMES,
    _add_dist_timeout,
    _add_folder_options,
    _device_arg,
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


def _add_adapt(sub) -> None:
    a, d, f = AdaptConfig(), DataConfig(), FolderConfig()
    p = sub.add_parser(
        "adapt",
        help="adapt a model to a new contrast pair without labels",
        description=(
            "Unsupervised domain adaptation on unlabelled target pairs: self-training on "
            "the model's own refined fields (default) or the paper's maximum classifier "
            "discrepancy (--method mcd). Target pairs come from one of: --target DIR, a "
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
        "--method",
        choices=ADAPT_METHODS,
        default=a.method,
        help=f"how to learn without labels (default {a.method}: the heads learn the "
        "model's own fields refined by MIND-SSC instance optimisation; mcd: the paper's "
        "maximum classifier discrepancy, with --discrepancy)",
    )
    p.add_argument(
        "--discrepancy",
        choices=[kind.value for kind in Discrepancy],
        default="pemd",
        help="MCD's discrepancy (default pemd; pemd16+ is the paper's p-EMD (16+))",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=f"iterations in all (default {a.steps} for self-training, "
        f"{AdaptConfig.mcd().steps} for mcd; with --resume: the saved run's, or more to "
        "extend it)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"learning rate (default {a.lr:g} for self-training, {AdaptConfig.mcd().lr:g} "
        "for mcd)",
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
    _add_dist_timeout(p)
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
    add_memory_option(p)
    p.set_defaults(func=_run_adapt)


def _adapt_spec(args, out: Path) -> AdaptationSpec:
    """The run the options describe (resolved against ``--resume`` by the run)."""
    return AdaptationSpec(
        targets=TargetOptions(
            target=args.target,
            target_fixed=args.target_fixed,
            target_moving=args.target_moving,
            unpaired=args.unpaired,
            demo_target=args.demo_target,
        ),
        model=args.model,
        source=args.source,
        discrepancy=args.discrepancy,
        config=AdaptConfig.for_method(
            args.method,
            batch_size=args.batch_size,
            seed=args.seed,
            **({} if args.lr is None else {"lr": args.lr}),
        ),
        data_config=DataConfig(size=args.size),
        folder_config=FolderConfig(
            axis=args.axis,
            min_foreground=args.min_foreground,
            val_fraction=args.val_fraction,
            eval_pairs=args.eval_pairs,
            target_pairs=args.target_pairs,
        ),
        steps=args.steps,
        skip_bad=args.skip_bad,
        allow_mixed_shapes=args.allow_mixed_shapes,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        state_path=_state_path(out),
        resume=args.resume,
        command=args.command_line,
        log=_say,
        warn=_warn,
        max_memory_gb=args.max_memory_gb,
    )


def _run_adapt(args) -> int:
    inputs = {
        "--model": args.model,
        "--source": args.source,
        "--target": args.target,
        "--target-fixed": args.target_fixed,
        "--target-moving": args.target_moving,
    }
    out = check_model_output(Path(args.output), inputs, resume=args.resume)
    spec = resolve_adaptation(_adapt_spec(args, out))  # bad options fail before torchrun's group
    ctx = init_distributed(args.device, timeout_s=args.dist_timeout)
    return run_distributed(ctx, lambda: _adapt(replace(spec, context=ctx), out, ctx))


def _adapt(spec: AdaptationSpec, out: Path, ctx: DistContext) -> int:
    run = run_adaptation(spec)
    start_step, method = run.start_step, run.spec.config.method
    discrepancy = run.spec.kind.value if method == "mcd" else method
    bar = _progress(
        run.total, f"adapt ({discrepancy})", initial=start_step, disable=not ctx.is_main
    )
    try:
        for progress in run:
            if progress.iteration == start_step:
                continue
            bar.update(1)
            losses = progress.record.losses
            postfix = (
                {"disc": f"{progress.discrepancy:.4f}"}
                if progress.discrepancy is not None
                else {"ce": f"{losses.get('pseudo_label_ce', float('nan')):.4f}"}
            )
            if progress.criterion is not None:
                postfix["crit"] = f"{progress.criterion:.4f}"
            postfix["best"] = str(progress.best_iteration)
            bar.set_postfix(postfix, refresh=False)
    except KeyboardInterrupt:
        run.close()  # stops after the iteration, keeps the best weights, saves the state
    finally:
        bar.close()
    result = run.result
    if result is None:  # interrupted before the first iteration began
        raise KeyboardInterrupt

    interrupted, diverged = result.interrupted, result.diverged
    saved = save_run_model(
        result.model, out, result.metadata, interrupted=bool(interrupted or diverged), ctx=ctx
    )
    if not ctx.is_main:
        return 1 if diverged else EXIT_INTERRUPTED if interrupted else 0
    completed, total, best_iter = result.completed_steps, result.total_steps, result.best_iteration
    state_path = result.state_path
    resume_hint = ""
    if state_path is not None and state_path.is_file():
        resume_hint = f"resume with: {PROG} adapt --resume {state_path} -o {out}" + (
            "" if result.state_saved else " (from the last saved state)"
        )
    kept = f" (the complete model at {out} was kept)" if saved != out else ""
    if result.state_error is not None and (diverged or interrupted):
        _warn(f"the adaptation state was not saved: {result.state_error}")
    if diverged:
        _warn(diverged)
        _say(f"saved the best weights (iteration {best_iter}) to {saved}{kept}")
        return 1
    if interrupted:
        _say(
            f"interrupted after {completed} of {total} iterations; saved the best weights "
            f"seen to {saved}{kept}"
        )
        if resume_hint:
            _say(resume_hint)
        return EXIT_USER_ERROR if result.state_error is not None else EXIT_INTERRUPTED
    init, best, criterion = (
        result.initial_criterion,
        result.best_criterion,
        run.spec.config.criterion,
    )
    crit = f"{criterion} {init:.4f} -> {best:.4f}" if init is not None and best is not None else ""
    _say(
        f"adapted with {discrepancy} for {completed - result.start_step} iterations in "
        f"{result.runtime_s:.1f} s ({completed} of {total} in all); best iteration {best_iter} "
        f"({crit}); saved {out}"
    )
    for line in (result.note(), result.selection_text(), result.pair_check_text()):
        if line:
            _say(f"  {line}")
    if result.state_error is not None:
        raise OSError(
            f"the model was saved to {out} but the adaptation state was not: {result.state_error}"
        )
    if result.state_saved:
        _say(f"  adaptation state: {state_path} (continue with --resume and a larger --steps)")
    sync = result.weight_difference
    if sync is not None:
        _say(f"  {ctx.world_size} processes ended with identical weights: {sync == 0.0}")
    evaluation = result.evaluation
    if evaluation:
        b, a, i = evaluation["before"], evaluation["after"], evaluation["identity"]
        _say(
            f"  held-out target evaluation ({evaluation['pairs']} pairs): label accuracy "
            f"{i['label_accuracy']:.1%} (identity) / {b['label_accuracy']:.1%} (before) -> "
            f"{a['label_accuracy']:.1%}; EPE {i['epe']:.3f} / {b['epe']:.3f} -> {a['epe']:.3f} px"
        )
    return 0
