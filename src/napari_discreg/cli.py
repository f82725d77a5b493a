"""The ``napari-discreg`` command line (also ``python -m napari_discreg``).

Sub-commands::

    napari-discreg register FIXED MOVING -o OUTDIR [--model CKPT]
    napari-discreg train -o CKPT [--source PATH ...] [--steps N] [--size PX]
                         [--checkpoint-every N] [--resume STATE] ...
    napari-discreg adapt -o CKPT [--source PATH ...]
                         (--target PATH ... [--target-moving PATH] [--unpaired]
                          | --target-fixed PATH --target-moving PATH | --demo-target N)
    napari-discreg demo -o OUTDIR [--size 192] [--seed 0] [--model CKPT]

Conventions
-----------
* Errors a user causes (a missing or unreadable file, images of different shapes,
  a bad checkpoint, an output folder that cannot be written) print
  ``napari-discreg: error: <message>`` to stderr and exit with status 2, without a
  traceback (``--traceback`` shows it, for bug reports).
* Outputs are all-or-nothing: where they will go is checked before any computing,
  every file is written to a temporary name in the output folder and the names are
  swapped in only once everything has been written. A failed or interrupted run
  leaves nothing behind (not even the output folder, if it created it).
* Ctrl-C during ``train`` or ``adapt`` stops after the current iteration and saves
  what there is (and says so); the exit status is then 130.
* ``train`` and ``adapt`` run unchanged under ``torchrun --nproc-per-node N`` (data
  parallel, :mod:`napari_discreg.core.distributed`): rank 0 prints, shows progress
  and writes the files; see docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .core import io

PROG = "napari-discreg"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ============================================================================ helpers


def _say(message: str = "") -> None:
    print(message, flush=True)


def _device_arg(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value.strip().lower()):
        raise argparse.ArgumentTypeError(f"invalid device {value!r}: use auto, cpu or cuda")
    return value.strip().lower()


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return x


def _jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")


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


def _make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    created = []
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise OSError(f"cannot create the output folder {folder} ({exc.strerror or exc})") from exc
    return created


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


class Outputs:
    """Files written together or not at all.

    ``Outputs(folder)`` checks at once that ``folder`` can be written (creating
    nothing). Inside ``with outputs:`` the folder is created, :meth:`path` hands out
    a temporary name in it for each output, and on a clean exit all temporary files
    are renamed onto their names; on an exception (or Ctrl-C) they are deleted, and
    so is any folder the block created.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = check_writable_dir(folder)
        self._staged: list[tuple[Path, Path]] = []
        self._created: list[Path] = []

    def __enter__(self) -> Outputs:
        self._created = _make_dirs(self.folder)
        return self

    def path(self, name: str) -> Path:
        """Where to write output ``name`` (a temporary file until the block ends)."""
        final = self.folder / name
        tmp = io.temporary_sibling(final)
        self._staged.append((tmp, final))
        return tmp

    def final(self, name: str) -> Path:
        return self.folder / name

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                for tmp, final in self._staged:
                    os.replace(tmp, final)
            except OSError as err:
                self._discard()
                raise OSError(f"cannot write the outputs in {self.folder} ({err})") from err
            return False
        self._discard()
        return False

    def _discard(self) -> None:
        for tmp, _ in self._staged:
            try:
                tmp.unlink()
            except OSError:
                pass
        _remove_empty(self._created)


def _load_model(path: str | None, device):
    """(model, description) for ``--model``; the shipped model when ``path`` is None."""
    from .core.checkpoint import default_weights_path, load_model

    if path is None:
        shipped = default_weights_path()
        if not shipped.is_file():
            raise ValueError(
                f"the pretrained model shipped with napari-discreg is missing ({shipped}); "
                f"train one with `{PROG} train -o model.safetensors` and pass it with --model"
            )
        return load_model(None, device), f"{shipped} (shipped)"
    return load_model(path, device), str(Path(path))


def _save_model(model, path: Path, extra: dict) -> None:
    """Save a checkpoint atomically, creating its folder; nothing is left on failure."""
    from . import save_model

    created = _make_dirs(path.parent)
    try:
        save_model(model, path, extra=_jsonable(extra))
    except BaseException:
        tmp = path.with_name(path.name + ".tmp")  # save_checkpoint's temporary name
        if tmp.exists():
            tmp.unlink()
        _remove_empty(created)
        raise


def _foreground(image: np.ndarray) -> np.ndarray | None:
    """Foreground of an image (normalised intensity > 0.05), None when (nearly) empty."""
    from .core.data import normalise_intensity

    mask = normalise_intensity(image) > 0.05
    return mask if mask.sum() >= 16 else None


def _progress(total: int, desc: str, *, initial: int = 0, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        unit="it",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=disable,
    )


# ========================================================================== register


def _add_register(sub) -> None:
    from .core.config import RefineConfig

    p = sub.add_parser(
        "register",
        help="register a moving image onto a fixed image",
        description=(
            "Register MOVING onto FIXED (2D images of one shape; a 3D file gives one "
            "slice, see --axis/--index). Writes OUTDIR/warped.tif (moving warped onto "
            "fixed), displacement.npy ((2, H, W) float32 pixels, row/col, "
            "warped(r, c) = moving(r + u[0], c + u[1])), discrepancy.tif (per control "
            "point, how much the two heads disagree) and summary.json."
        ),
    )
    p.add_argument("fixed", help="fixed image (.png .jpg .tif .nii .nii.gz .npy)")
    p.add_argument("moving", help="moving image, same shape as FIXED")
    p.add_argument("-o", "--outdir", required=True, help="output folder (created if needed)")
    p.add_argument(
        "--model", help="checkpoint (.safetensors); default: the shipped pretrained model"
    )
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--axis", type=int, help="slice axis for 3D files (default 0; 2 for NIfTI)")
    p.add_argument("--index", type=int, help="slice index for 3D files (default: middle)")
    p.add_argument(
        "--refine",
        type=_non_negative_int,
        nargs="?",
        const=RefineConfig.steps,
        default=0,
        metavar="STEPS",
        help="after the network, refine the field by instance optimisation (MIND-SSC "
        f"similarity + smoothness, Adam); STEPS defaults to {RefineConfig.steps}",
    )
    p.set_defaults(func=_run_register)


def _run_register(args) -> int:
    from . import register
    from .core.metrics import normalised_mutual_information
    from .core.model import resolve_device

    outputs = Outputs(args.outdir)
    fixed = io.read_image(args.fixed, axis=args.axis, index=args.index)
    moving = io.read_image(args.moving, axis=args.axis, index=args.index)
    if fixed.shape != moving.shape:
        raise ValueError(
            f"fixed {args.fixed} is {fixed.shape[0]} x {fixed.shape[1]} but moving {args.moving} "
            f"is {moving.shape[0]} x {moving.shape[1]}; resample or crop one onto the other's grid"
        )
    device = resolve_device(args.device)
    model, model_desc = _load_model(args.model, device)

    start = time.perf_counter()
    result = register(fixed, moving, model=model, device=device, refine=args.refine)
    runtime = time.perf_counter() - start

    magnitude = np.sqrt((result.displacement.astype(np.float64) ** 2).sum(0))
    mask = _foreground(fixed)
    nmi_before = normalised_mutual_information(fixed, moving, mask=mask)
    nmi_after = normalised_mutual_information(fixed, result.warped, mask=mask)
    names = {
        "warped": "warped.tif",
        "displacement": "displacement.npy",
        "discrepancy": "discrepancy.tif",
        "summary": "summary.json",
    }
    summary = {
        "fixed": str(args.fixed),
        "moving": str(args.moving),
        "shape": list(fixed.shape),
        "model": model_desc,
        "device": str(device),
        "runtime_s": runtime,
        "refine_steps": result.refine_steps,
        "displacement_px": {"mean_abs": float(magnitude.mean()), "max_abs": float(magnitude.max())},
        "nmi": {
            "before": nmi_before,
            "after": nmi_after,
            "region": "fixed foreground" if mask is not None else "whole image",
        },
        "discrepancy": {
            "mean": float(result.discrepancy.mean()),
            "max": float(result.discrepancy.max()),
            "control_grid": list(result.discrepancy.shape),
            "stride_px": result.stride,
        },
        "num_labels": int(result.offsets.shape[0]),
        "capture_range_px": float(result.offsets.max()),
        "outputs": {k: str(outputs.final(v)) for k, v in names.items()},
        "command": args.command_line,
    }
    with outputs:
        io.write_image(outputs.path(names["warped"]), result.warped)
        io.write_field(outputs.path(names["displacement"]), result.displacement)
        io.write_image(outputs.path(names["discrepancy"]), result.discrepancy)
        _write_json(outputs.path(names["summary"]), summary)

    h, w = fixed.shape
    refined = f", refined with {result.refine_steps} steps" if result.refine_steps else ""
    _say(
        f"registered {args.moving} onto {args.fixed} ({h} x {w}) in {runtime:.2f} s on {device}"
        + refined
    )
    _say(f"  |u| mean {magnitude.mean():.2f} px, max {magnitude.max():.2f} px")
    _say(
        f"  NMI {nmi_before:.4f} -> {nmi_after:.4f}; mean head discrepancy {result.discrepancy.mean():.3f}"
    )
    _say(f"  wrote {', '.join(names.values())} in {outputs.folder}")
    return 0


# ============================================================================= train


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= x < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return x


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _add_folder_options(p, *, axis: bool) -> None:
    """Options shared by ``train`` and ``adapt`` for the user's own image folders."""
    from .core.config import FolderConfig

    f = FolderConfig()
    g = p.add_argument_group(
        "your own images (folders, files or lists of 2D images and 3D volumes: "
        f"{' '.join(io.IMAGE_EXTENSIONS)})"
    )
    if axis:
        g.add_argument(
            "--axis",
            type=int,
            help="axis to slice 3D volumes along (default 0 for TIFF/.npy, 2 for NIfTI)",
        )
    g.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out files that cannot be used (each named in a warning) and go on with "
        "the good ones; without it any bad file stops the run with a message naming it",
    )
    g.add_argument(
        "--allow-mixed-shapes",
        action="store_true",
        help="accept files of different shapes (each is fitted into --size on its own)",
    )
    g.add_argument(
        "--min-foreground",
        type=_fraction,
        default=f.min_foreground,
        help="keep slices whose foreground area is at least this share of the largest "
        f"slice's in the same file (default {f.min_foreground})",
    )
    g.add_argument(
        "--val-fraction",
        type=_fraction,
        default=f.val_fraction,
        help="share of the files held out for the evaluation at the end; 0: no evaluation "
        f"(default {f.val_fraction})",
    )
    g.add_argument(
        "--eval-pairs",
        type=_non_negative_int,
        default=f.eval_pairs,
        help=f"held-out synthetic pairs in that evaluation (default {f.eval_pairs})",
    )
    g.add_argument(
        "--workers",
        type=_non_negative_int,
        default=0,
        help="background processes that make the training pairs (default 0: none)",
    )


def _load_folder(paths, *, name: str, args, size: int, folder_cfg, ctx):
    """A SliceDataset of ``paths``; bad files skipped (with a warning) under --skip-bad."""
    from .core.dataset import SliceDataset

    ds = SliceDataset.from_paths(
        paths,
        size=size,
        config=folder_cfg,
        skip_bad=args.skip_bad,
        allow_mixed_shapes=args.allow_mixed_shapes,
        name=name,
    )
    _report_bad(ds.bad, ctx)
    if ctx.is_main:
        _say(ds.describe())
    return ds


def _report_bad(bad, ctx) -> None:
    if ctx.is_main:
        for b in bad:
            print(f"{PROG}: warning: skipped {b}", file=sys.stderr)


def _state_path(out: Path) -> Path:
    """Where ``--checkpoint-every`` writes the training state next to ``-o OUT``."""
    name = out.name
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    return out.with_name(stem + ".state.safetensors")


def _evaluation_text(evaluation: dict | None) -> str:
    if not evaluation:
        return ""
    ident, mod = evaluation["identity"], evaluation["model"]
    return (
        f"held-out evaluation ({evaluation['pairs']} pairs): label accuracy "
        f"{ident['label_accuracy']:.1%} -> {mod['label_accuracy']:.1%}, EPE "
        f"{ident['epe']:.3f} -> {mod['epe']:.3f} px, folding {mod['folding']:.3%}"
    )


def _add_train(sub) -> None:
    from .core.config import DataConfig, ModelConfig, TrainConfig

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
    from .core.distributed import init_distributed, shutdown

    out = check_writable_file(args.output)
    ctx = init_distributed(args.device)
    try:
        return _train(args, out, ctx)
    finally:
        shutdown(ctx)


def _train_settings(args):
    """(model config, train config, data config, folder config, run settings) from the
    command line, or from the training state given with --resume."""
    from .core.checkpoint import read_checkpoint
    from .core.config import DataConfig, FolderConfig, ModelConfig, TrainConfig
    from .core.data import CONTRASTS

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

    from .core.checkpoint import load_training_state, save_training_state
    from .core.dataset import PairBatches, PairMaker, evaluate_pairs, make_pairs, split_holdout
    from .core.distributed import (
        all_reduce_mean,
        barrier,
        ddp_source_loss,
        max_weight_difference,
    )
    from .core.model import DiscreteRegistrationNet
    from .core.train import source_batches, train_steps

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


# ============================================================================= adapt


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
    from .core.config import AdaptConfig, DataConfig, FolderConfig

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
            "of the MNI template. The weights with the best unsupervised criterion (NMI "
            "of fixed vs warped target) are kept, so more steps never give a worse "
            "model by that measure. Runs under torchrun (docs/scaling.md)."
        ),
    )
    p.add_argument(
        "-o", "--output", required=True, help="adapted checkpoint to write (.safetensors)"
    )
    p.add_argument("--model", help="checkpoint to adapt; default: the shipped pretrained model")
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
        "--discrepancy", choices=("l1", "swd", "pemd"), default="pemd", help="default pemd"
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
    from .core.distributed import init_distributed, shutdown

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
    from .core.checkpoint import read_checkpoint

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
    from .core.dataset import (
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
    from . import adapt_steps
    from .core.checkpoint import checkpoint_info, load_adaptation_state, save_adaptation_state
    from .core.config import AdaptConfig, DataConfig, FolderConfig
    from .core.dataset import PairBatches, PairMaker, evaluate_pairs
    from .core.distributed import (
        average_gradients,
        barrier,
        broadcast_module,
        max_weight_difference,
    )
    from .core.train import AdaptState, source_batches

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
        from .core.data import fixed_test_pairs, load_template

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
        source = source_batches(dcfg, cfg.batch_size, ("t1", "t2", "pd"), rng, ctx.device)
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
                "selection_criterion": (
                    "normalised mutual information of fixed vs warped target pairs over the "
                    "foreground (higher is better)"
                ),
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
    if before is not None and not interrupted:
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
    crit = f"NMI {init:.4f} -> {best:.4f}" if init is not None and best is not None else ""
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


# ============================================================================== demo


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="register a built-in T1 vs T2-like pair and write a report",
        description=(
            "Make a sample multimodal pair (T1 fixed, T2-like moving, known random "
            "deformation) from the MNI template, register it (network + instance-"
            "optimisation refinement, and the network alone for comparison) and write "
            "OUTDIR/report.png, report.json and report.md with the end-point error, "
            "NMI, Dice of CSF/GM/WM, folding and runtime."
        ),
    )
    from .core.config import RefineConfig

    p.add_argument("-o", "--outdir", required=True, help="output folder (created if needed)")
    p.add_argument("--size", type=_positive_int, default=192, help="image size in px (default 192)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the deformation and noise (default 0)"
    )
    p.add_argument(
        "--slice",
        type=int,
        dest="slice_index",
        help="axial template slice (default: middle test slice)",
    )
    p.add_argument("--model", help="checkpoint; default: the shipped pretrained model")
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu or cuda")
    p.add_argument(
        "--refine",
        type=_non_negative_int,
        default=RefineConfig().steps,
        metavar="STEPS",
        help=f"refinement steps after the network (default {RefineConfig().steps}; 0: the "
        "network alone)",
    )
    p.set_defaults(func=_run_demo)


def _label_accuracy(result, truth: np.ndarray, mask: np.ndarray) -> float:
    """Share of foreground control points whose argmax label is the true quantised one."""
    from .core.evaluate import control_point_accuracy

    k, q = result.offsets.shape[0], float(result.offsets.max())
    return control_point_accuracy(result.labels, truth, mask, result.stride, k, q)


def demo_metrics(pair, result, runtime: float) -> dict[str, Any]:
    """The numbers of the demo report for a :class:`~napari_discreg.core.data.Pair`."""
    from .core.data import TISSUES
    from .core.metrics import dice, end_point_error, folding_fraction, normalised_mutual_information
    from .core.warp import warp_numpy

    mask = pair.mask > 0
    zero = np.zeros_like(pair.displacement)
    warped_labels = warp_numpy(pair.moving_labels, result.displacement, order=0)
    return {
        "epe_px": {
            "identity": end_point_error(zero, pair.displacement, mask),
            "registered": end_point_error(result.displacement, pair.displacement, mask),
        },
        "nmi": {
            "before": normalised_mutual_information(pair.fixed, pair.moving, mask=mask),
            "after": normalised_mutual_information(pair.fixed, result.warped, mask=mask),
        },
        "dice": {
            name: {
                "before": dice(pair.moving_labels, pair.fixed_labels, label),
                "after": dice(warped_labels, pair.fixed_labels, label),
            }
            for label, name in enumerate(TISSUES, start=1)
        },
        "label_accuracy": _label_accuracy(result, pair.displacement, mask),
        "folding_fraction": folding_fraction(result.displacement, mask),
        "mean_discrepancy": float(result.discrepancy.mean()),
        "true_max_displacement_px": float(np.sqrt((pair.displacement**2).sum(0)).max()),
        "runtime_s": runtime,
    }


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    from .core.data import normalise_intensity

    rr, cc = np.indices(a.shape)
    tile = max(1, min(a.shape) // tiles)
    return np.where(
        (rr // tile + cc // tile) % 2 == 0, normalise_intensity(a), normalise_intensity(b)
    )


def demo_figure(pair, result, metrics: dict[str, Any]):
    """The report figure (a :class:`matplotlib.figure.Figure`, Agg canvas, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 8.6), layout="constrained")
    axes = fig.subplots(2, 4)
    gray = {"cmap": "gray", "interpolation": "nearest"}
    epe, nmi = metrics["epe_px"], metrics["nmi"]

    def show(ax, image, title, **kw):
        im = ax.imshow(image, **{**gray, **kw})
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
        return im

    show(axes[0, 0], pair.fixed, f"fixed ({pair.fixed_contrast.upper()})")
    show(axes[0, 1], pair.moving, f"moving ({pair.moving_contrast.upper()}-like)")
    show(axes[0, 2], result.warped, "moving warped onto fixed")
    pred_mag = np.sqrt((result.displacement**2).sum(0))
    true_mag = np.sqrt((pair.displacement**2).sum(0))
    vmax = float(max(pred_mag.max(), true_mag.max(), 1e-6))
    im = show(
        axes[0, 3],
        pred_mag,
        "|u| predicted (px); arrows x3:\nwhite predicted, red true",
        cmap="viridis",
        vmin=0,
        vmax=vmax,
    )
    fig.colorbar(im, ax=axes[0, 3], shrink=0.8)
    h, w = pred_mag.shape
    step = max(1, min(h, w) // 16)
    rr, cc = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    for field, colour in ((pair.displacement, "red"), (result.displacement, "white")):
        axes[0, 3].quiver(
            cc,
            rr,
            field[1, rr, cc],
            field[0, rr, cc],
            color=colour,
            angles="xy",
            scale_units="xy",
            scale=1 / 3,
            width=0.004,
        )
    show(
        axes[1, 0],
        _checkerboard(pair.fixed, pair.moving),
        f"checkerboard before (NMI {nmi['before']:.3f})",
    )
    show(
        axes[1, 1],
        _checkerboard(pair.fixed, result.warped),
        f"checkerboard after (NMI {nmi['after']:.3f})",
    )
    err = np.sqrt(((result.displacement - pair.displacement) ** 2).sum(0)) * (pair.mask > 0)
    im = show(
        axes[1, 2],
        err,
        f"|u predicted - u true| in brain (px)\nEPE {epe['identity']:.2f} -> "
        f"{epe['registered']:.2f} px",
        cmap="magma",
        vmin=0,
        vmax=vmax,
    )
    fig.colorbar(im, ax=axes[1, 2], shrink=0.8)
    s = result.stride
    gh, gw = result.discrepancy.shape
    im = show(
        axes[1, 3],
        result.discrepancy,
        "head discrepancy (pEMD, bins)",
        cmap="inferno",
        extent=(-0.5, gw * s - 0.5, gh * s - 0.5, -0.5),
    )
    axes[1, 3].set_xlim(-0.5, w - 0.5)
    axes[1, 3].set_ylim(h - 0.5, -0.5)
    fig.colorbar(im, ax=axes[1, 3], shrink=0.8)
    d = metrics["dice"]
    fig.suptitle(
        f"napari-discreg demo: slice {pair.index}, {h} x {w} px; Dice GM {d['gm']['before']:.2f} -> "
        f"{d['gm']['after']:.2f}, WM {d['wm']['before']:.2f} -> {d['wm']['after']:.2f}, CSF "
        f"{d['csf']['before']:.2f} -> {d['csf']['after']:.2f}; folding "
        f"{metrics['folding_fraction']:.2%}; {metrics['runtime_s']:.2f} s",
        fontsize=11,
    )
    return fig


def demo_markdown(report: dict[str, Any]) -> str:
    m, p = report["metrics"], report["pair"]
    rows = [
        (
            "end-point error over the brain (px)",
            m["epe_px"]["identity"],
            m["epe_px"]["registered"],
            ".3f",
        ),
        ("normalised mutual information", m["nmi"]["before"], m["nmi"]["after"], ".4f"),
        *(
            (f"Dice {t.upper()}", m["dice"][t]["before"], m["dice"][t]["after"], ".3f")
            for t in ("gm", "wm", "csf")
        ),
    ]
    lines = [
        "# napari-discreg demo",
        "",
        f"Fixed {p['fixed_contrast'].upper()}, moving {p['moving_contrast'].upper()}-like, axial "
        f"template slice {p['slice']}, {p['size']} x {p['size']} px, seed {p['seed']}; known random "
        f"deformation of at most {m['true_max_displacement_px']:.2f} px.",
        f"Model: {report['model']}; device {report['device']}.",
        "",
        "| measure | before (identity) | after registration |",
        "|---|---|---|",
        *(f"| {name} | {a:{fmt}} | {b:{fmt}} |" for name, a, b, fmt in rows),
        "",
        *(
            [
                f"- registration: the network, then {m['refine_steps']} steps of "
                "instance-optimisation refinement (`register(refine=...)`); the network "
                f"alone: EPE {m['network_only']['epe_px']:.3f} px, NMI "
                f"{m['network_only']['nmi_after']:.4f}, label accuracy "
                f"{m['network_only']['label_accuracy']:.1%}, "
                f"{m['network_only']['runtime_s']:.3f} s",
            ]
            if m.get("network_only")
            else ["- registration: the network alone (no refinement)"]
        ),
        f"- label accuracy of the network's histograms (foreground control points; the "
        f"refinement does not change them): {m['label_accuracy']:.1%}",
        f"- folding (Jacobian determinant <= 0, brain): {m['folding_fraction']:.3%}",
        f"- mean head discrepancy (pEMD, bins): {m['mean_discrepancy']:.4f}",
        f"- runtime of one registration (after a warm-up call): {m['runtime_s']:.3f} s",
        "",
        "![report](report.png)",
        "",
    ]
    return "\n".join(lines)


def _run_demo(args) -> int:
    from . import register
    from .core.config import DataConfig
    from .core.data import load_template, make_pair
    from .core.model import resolve_device

    outputs = Outputs(args.outdir)
    dcfg = DataConfig(size=args.size)
    index = args.slice_index if args.slice_index is not None else sum(dcfg.test_slices) // 2
    device = resolve_device(args.device)
    model, model_desc = _load_model(args.model, device)
    template = load_template(args.size)
    pair = make_pair(template, index, "t1", "t2", np.random.default_rng(args.seed), dcfg)

    runs = {}
    for steps in sorted({0, args.refine}):
        register(pair.fixed, pair.moving, model=model, device=device, refine=steps)  # warm-up
        start = time.perf_counter()
        res = register(pair.fixed, pair.moving, model=model, device=device, refine=steps)
        runs[steps] = (res, time.perf_counter() - start)
    result, runtime = runs[args.refine]
    metrics = demo_metrics(pair, result, runtime)
    metrics["refine_steps"] = args.refine
    if args.refine:
        net, net_time = runs[0]
        net_metrics = demo_metrics(pair, net, net_time)
        metrics["network_only"] = {
            "epe_px": net_metrics["epe_px"]["registered"],
            "nmi_after": net_metrics["nmi"]["after"],
            "label_accuracy": net_metrics["label_accuracy"],
            "runtime_s": net_time,
        }
    report = {
        "pair": {
            "fixed_contrast": pair.fixed_contrast,
            "moving_contrast": pair.moving_contrast,
            "slice": pair.index,
            "size": args.size,
            "seed": args.seed,
        },
        "model": model_desc,
        "device": str(device),
        "metrics": metrics,
        "command": args.command_line,
        "napari_discreg_version": __version__,
    }
    fig = demo_figure(pair, result, metrics)
    with outputs:
        fig.savefig(outputs.path("report.png"), dpi=100, format="png")
        _write_json(outputs.path("report.json"), report)
        _write_text(outputs.path("report.md"), demo_markdown(report))

    epe, d = metrics["epe_px"], metrics["dice"]
    how = f"network + {args.refine} refinement steps" if args.refine else "network alone"
    _say(
        f"demo: T1 vs T2-like slice {pair.index}, {args.size} px, registered ({how}) in "
        f"{runtime:.2f} s on {device}"
    )
    if args.refine:
        net = metrics["network_only"]
        _say(f"  network alone: EPE {net['epe_px']:.3f} px in {net['runtime_s']:.2f} s")
    _say(
        f"  EPE {epe['identity']:.3f} -> {epe['registered']:.3f} px; NMI {metrics['nmi']['before']:.4f} -> "
        f"{metrics['nmi']['after']:.4f}"
    )
    _say(
        f"  Dice GM {d['gm']['before']:.3f} -> {d['gm']['after']:.3f}, WM {d['wm']['before']:.3f} -> "
        f"{d['wm']['after']:.3f}, CSF {d['csf']['before']:.3f} -> {d['csf']['after']:.3f}; "
        f"folding {metrics['folding_fraction']:.3%}"
    )
    _say(f"report: {outputs.final('report.png')} (also report.json, report.md)")
    return 0


# ============================================================================== main


# Sub-commands, in the order ``--help`` lists them. Each adder gets the sub-parsers
# object, adds its parser and sets ``func`` (args -> exit status). The lead adds
# ``benchmark`` here.
def _add_benchmark(sub) -> None:
    from ._bench_cli import add_parser

    add_parser(sub)


_SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_register,
    _add_train,
    _add_adapt,
    _add_demo,
    _add_benchmark,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Learned discrete multimodal 2D registration (Heinrich & Hansen, MIDL 2020), "
            "adapted to new contrasts by maximum classifier discrepancy."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full traceback on errors (for bug reports)",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (status 2)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    args.command_line = shlex.join([PROG, *argv])
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:
        if args.traceback:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
