"""The ``napari-discreg`` command line (also ``python -m napari_discreg``).

Sub-commands::

    napari-discreg register FIXED MOVING -o OUTDIR [--model CKPT]
    napari-discreg train -o CKPT [--steps N] [--size PX] ...
    napari-discreg adapt -o CKPT (--target-fixed PATH --target-moving PATH | --demo-target N)
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


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, file=sys.stderr)


# ========================================================================== register


def _add_register(sub) -> None:
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
    result = register(fixed, moving, model=model, device=device)
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
    _say(f"registered {args.moving} onto {args.fixed} ({h} x {w}) in {runtime:.2f} s on {device}")
    _say(f"  |u| mean {magnitude.mean():.2f} px, max {magnitude.max():.2f} px")
    _say(
        f"  NMI {nmi_before:.4f} -> {nmi_after:.4f}; mean head discrepancy {result.discrepancy.mean():.3f}"
    )
    _say(f"  wrote {', '.join(names.values())} in {outputs.folder}")
    return 0


# ============================================================================= train


def _add_train(sub) -> None:
    from .core.config import DataConfig, ModelConfig, TrainConfig

    t, d, m = TrainConfig(), DataConfig(), ModelConfig()
    p = sub.add_parser(
        "train",
        help="train a model on synthetic mono-modal pairs (source domain)",
        description=(
            "Supervised source training of a new model on synthetic pairs made from "
            "the MNI template shipped with nilearn (fixed and moving of the same "
            "contrast). Ctrl-C stops early and saves the model trained so far."
        ),
    )
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--steps", type=_positive_int, default=t.steps, help=f"iterations (default {t.steps})"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=t.batch_size,
        help=f"pairs per step (default {t.batch_size})",
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
        help=f"comma-separated source contrasts, each paired with itself (default {','.join(t.source_contrasts)})",
    )
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu or cuda")
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
    import torch

    from .core.config import DataConfig, ModelConfig, TrainConfig
    from .core.model import DiscreteRegistrationNet, resolve_device
    from .core.train import train_steps

    out = check_writable_file(args.output)
    contrasts = tuple(c.strip().lower() for c in args.contrasts.split(",") if c.strip())
    from .core.data import CONTRASTS

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
    dcfg = DataConfig(size=args.size)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)  # reproducible initial weights
    model = DiscreteRegistrationNet(mcfg)

    steps = train_steps(model, config=tcfg, data_config=dcfg, device=device)
    bar = _progress(tcfg.steps, "train")
    completed, last, interrupted = 0, {}, False
    start = time.perf_counter()
    try:
        for record in steps:
            completed, last = record.iteration, record.losses
            bar.update(1)
            bar.set_postfix(
                loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.1%}", refresh=False
            )
    except KeyboardInterrupt:
        interrupted = True
        steps.close()
    finally:
        bar.close()
    model.eval()
    elapsed = time.perf_counter() - start

    extra = {
        "training": {
            **tcfg.to_dict(),
            "data_config": dcfg.to_dict(),
            "completed_steps": completed,
            "interrupted": interrupted,
            "final_loss": last.get("loss"),
            "final_accuracy": last.get("accuracy"),
            "device": str(device),
            "runtime_s": elapsed,
        },
        "command": args.command_line,
        "napari_discreg_version": __version__,
    }
    _save_model(model, out, extra)
    if interrupted:
        _say(
            f"interrupted after {completed} of {tcfg.steps} steps; saved the model trained so far to {out}"
        )
        return EXIT_INTERRUPTED
    acc = last.get("accuracy", float("nan"))
    _say(
        f"trained {completed} steps in {elapsed:.1f} s (last loss {last.get('loss', float('nan')):.3f}, "
        f"label accuracy {acc:.1%}); saved {out}"
    )
    return 0


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
    from .core.config import AdaptConfig, DataConfig

    a, d = AdaptConfig(), DataConfig()
    p = sub.add_parser(
        "adapt",
        help="adapt a model to a new contrast pair without labels (MCD)",
        description=(
            "Unsupervised domain adaptation by maximum classifier discrepancy on "
            "unlabelled target pairs. --target-fixed and --target-moving are each a "
            "stack/volume file (sliced along --axis) or a folder of 2D images, paired "
            "in sorted order; or use --demo-target N for N built-in T1 (fixed) vs "
            "T2-like (moving) pairs. The weights with the best unsupervised criterion "
            "(NMI of fixed vs warped target) are kept, so more steps never give a "
            "worse model by that measure."
        ),
    )
    p.add_argument(
        "-o", "--output", required=True, help="adapted checkpoint to write (.safetensors)"
    )
    p.add_argument("--model", help="checkpoint to adapt; default: the shipped pretrained model")
    p.add_argument("--target-fixed", help="fixed target images: stack/volume file or folder")
    p.add_argument("--target-moving", help="moving target images: stack/volume file or folder")
    p.add_argument(
        "--demo-target", type=_positive_int, metavar="N", help="use N built-in T1 vs T2-like pairs"
    )
    p.add_argument(
        "--discrepancy", choices=("l1", "swd", "pemd"), default="pemd", help="default pemd"
    )
    p.add_argument("--steps", type=int, default=a.steps, help=f"MCD iterations (default {a.steps})")
    p.add_argument(
        "--lr", type=_positive_float, default=a.lr, help=f"learning rate (default {a.lr:g})"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=a.batch_size, help=f"default {a.batch_size}"
    )
    p.add_argument("--seed", type=int, default=a.seed, help=f"random seed (default {a.seed})")
    p.add_argument(
        "--size",
        type=_positive_int,
        default=d.size,
        help=f"px of the built-in source pairs and of --demo-target pairs (default {d.size})",
    )
    p.add_argument("--axis", type=int, help="slice axis of target volumes (default 0; 2 for NIfTI)")
    p.add_argument("--device", type=_device_arg, default="auto", help="auto (default), cpu or cuda")
    p.set_defaults(func=_run_adapt)


def _run_adapt(args) -> int:
    from . import adapt_steps
    from .core.checkpoint import checkpoint_info
    from .core.config import AdaptConfig, DataConfig
    from .core.model import resolve_device

    out = check_writable_file(args.output)
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    dcfg = DataConfig(size=args.size)
    if args.demo_target is not None:
        if args.target_fixed or args.target_moving:
            raise ValueError(
                "give either --demo-target or --target-fixed/--target-moving, not both"
            )
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
    else:
        if not (args.target_fixed and args.target_moving):
            raise ValueError("give --target-fixed and --target-moving (or --demo-target N)")
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

    device = resolve_device(args.device)
    model, model_desc = _load_model(args.model, device)
    base_info = checkpoint_info(args.model)
    base_info.pop("model_config", None)
    cfg = AdaptConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)

    steps = adapt_steps(
        model,
        fixed,
        moving,
        discrepancy=args.discrepancy,
        config=cfg,
        data_config=dcfg,
        device=device,
    )
    bar = _progress(cfg.steps, f"adapt ({args.discrepancy})")
    completed, best_iter, interrupted, diverged = 0, 0, False, None
    criteria: dict[int, float] = {}
    start = time.perf_counter()
    try:
        for record in steps:
            if record.criterion is not None:
                criteria[record.iteration] = record.criterion
            best_iter = record.best_iteration if record.best_iteration is not None else best_iter
            if record.iteration == 0:
                continue
            completed = record.iteration
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

    extra = {
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
            "target": target,
            "target_pairs": int(fixed.shape[0]),
            "base_model": model_desc,
            "interrupted": interrupted,
            "diverged": diverged,
            "device": str(device),
            "runtime_s": elapsed,
        },
        "base_model_info": base_info,
        "command": args.command_line,
        "napari_discreg_version": __version__,
    }
    _save_model(model, out, extra)
    if diverged:
        print(f"{PROG}: warning: {diverged}", file=sys.stderr)
        _say(f"saved the best weights (iteration {best_iter}) to {out}")
        return 1
    if interrupted:
        _say(
            f"interrupted after {completed} of {cfg.steps} iterations; saved the best weights "
            f"seen to {out}"
        )
        return EXIT_INTERRUPTED
    init, best = criteria.get(0), criteria.get(best_iter)
    crit = f"NMI {init:.4f} -> {best:.4f}" if init is not None and best is not None else ""
    _say(
        f"adapted with {args.discrepancy} for {completed} iterations in {elapsed:.1f} s; best "
        f"iteration {best_iter} ({crit}); saved {out}"
    )
    return 0


# ============================================================================== demo


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="register a built-in T1 vs T2-like pair and write a report",
        description=(
            "Make a sample multimodal pair (T1 fixed, T2-like moving, known random "
            "deformation) from the MNI template, register it and write "
            "OUTDIR/report.png, report.json and report.md with the end-point error, "
            "NMI, Dice of CSF/GM/WM, folding and runtime."
        ),
    )
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
    p.set_defaults(func=_run_demo)


def _label_accuracy(result, truth: np.ndarray, mask: np.ndarray) -> float:
    """Share of foreground control points whose argmax label is the true quantised one."""
    import torch
    import torch.nn.functional as F

    from .core.labels import quantise
    from .core.preprocess import pad_to_multiple
    from .core.warp import control_point_field

    k, q, s = result.offsets.shape[0], float(result.offsets.max()), result.stride
    u = pad_to_multiple(torch.from_numpy(truth)[None], s)
    m = pad_to_multiple(torch.from_numpy(mask.astype(np.float32))[None, None], s)
    true_labels = quantise(control_point_field(u, s), k, q)[0].numpy()
    fg = (F.max_pool2d(m, s) > 0)[0, 0].numpy()
    return float((true_labels == result.labels)[fg].mean()) if fg.any() else float("nan")


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
        f"- label accuracy (foreground control points): {m['label_accuracy']:.1%}",
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

    register(pair.fixed, pair.moving, model=model, device=device)  # warm-up: lazy init, caches
    start = time.perf_counter()
    result = register(pair.fixed, pair.moving, model=model, device=device)
    runtime = time.perf_counter() - start
    metrics = demo_metrics(pair, result, runtime)
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
    _say(
        f"demo: T1 vs T2-like slice {pair.index}, {args.size} px, registered in {runtime:.2f} s on {device}"
    )
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
