"""Training data from the user's own scans: folders (or lists) of 2D images and 3D volumes.

From files to slices
--------------------
Every file is read with :func:`napari_discreg.core.files.imagefiles.read_stack` (PNG/JPEG/BMP,
TIFF, NIfTI, ``.npy``). A 2D image is one slice; a 3D volume is sliced along
``FolderConfig.axis`` (default: the reader's, 0 for TIFF/``.npy`` stacks and 2 for
NIfTI, in voxel-array order: the NIfTI affine and the voxel size are not used, so
slice along an axis whose planes have square pixels). Then, per file:

1. intensities are normalised over the whole file with
   :func:`~napari_discreg.core.registration.preprocess.normalise_intensity` (robust percentiles), so all
   slices of a volume share one scale;
2. the foreground is where the normalised intensity exceeds
   ``FolderConfig.foreground_threshold`` or half the file's Otsu threshold, whichever
   is higher (so a noisy background stays background), cleaned slice by slice (a
   binary opening removes noise specks, holes are filled);
3. slices whose foreground area is at least ``FolderConfig.min_foreground`` times the
   largest slice's (and at least 64 pixels) are kept, so the nearly empty slices at
   the ends of a volume are left out;
4. one box per file, the bounding box of the kept foreground plus a margin, is cut
   out of every kept slice and resampled (bilinear, anti-aliased when shrinking) to
   fit ``size x size`` with its aspect ratio kept and zero padding, as the template
   slices of :func:`~napari_discreg.core.data.template.load_template`.

Bad input
---------
An empty folder or a missing path raises :class:`ValueError` at once. A file that
cannot be read, holds no foreground, or whose shape differs from the shape most of
the files share (a 2D image among volumes, volumes of different sizes) is a
:class:`BadFile`; by default any bad file raises :class:`BadInputError`, whose
message names every bad file and why. With ``skip_bad=True`` (``--skip-bad`` on the
command line) they are left out, listed in :attr:`SliceDataset.bad`, and the good
files are used. ``allow_mixed_shapes=True`` accepts files of different shapes, each
fitted into ``size x size`` on its own (pixel sizes then differ between files).

Pairs
-----
The pairs follow :func:`~napari_discreg.core.data.template.make_pair`: two images of one
slice each get their own smooth random bias field, blur (``DataConfig.blur``),
normalisation over the foreground and noise; a smooth random field ``u`` from
:func:`~napari_discreg.core.data.template.random_field` gives ``fixed = warp(img_a, u)`` and
``moving = img_b``, so registering ``moving`` onto ``fixed`` must recover ``u``.

* **Source** (labelled, mono-modal): ``img_a`` and ``img_b`` are the same slice.
* **Target, paired**: ``img_a`` is a slice of contrast A and ``img_b`` the same slice
  of contrast B of the same subject. Files are matched by sorted order (file ``i`` of
  one folder with file ``i`` of the other); each pair must have one shape and shares
  one crop box, so A and B stay voxel-aligned and ``u`` is the true misalignment
  (ground truth for the evaluation, never for adaptation). This assumes that the two
  contrasts of a subject are co-registered, as they are in most public data sets.
* **Target, unpaired**: there is no voxel correspondence between the folders. Each
  fixed slice of contrast A is paired with the slice of a randomly chosen file of
  contrast B at the same relative position along the slicing axis (relative to each
  file's kept foreground slices), plus the synthetic ``u``. The pair is then an
  inter-subject registration whose true field is unknown (anatomy differs as well as
  ``u``), so no accuracy can be measured; adaptation only needs such unlabelled pairs
  to have the target domain's appearance.

Every random draw of a batch comes from ``numpy.random.default_rng([seed, rank, step])``
and the slice order from a seeded :class:`torch.utils.data.DistributedSampler`, so
batch ``step`` of rank ``rank`` is always the same: a resumed run sees exactly the
data an uninterrupted run would have seen, and ranks see disjoint shards.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from torch.utils.data import Dataset, DistributedSampler, Subset

from ..config import DataConfig, FolderConfig
from ..files import imagefiles
from ..learning.evaluate import evaluate_model, identity_metrics, summarise
from ..registration.preprocess import normalise_intensity
from ..registration.warp import warp_numpy
from .template import Pair, appearance, deform_pair

__all__ = [
    "BadFile",
    "BadInputError",
    "PairBatches",
    "PairMaker",
    "PairSet",
    "SliceDataset",
    "evaluate_pairs",
    "list_images",
    "load_paired",
    "make_pairs",
    "shard",
    "split_holdout",
    "synthetic_pair",
]

MIN_FOREGROUND_PIXELS = 64
"""A slice needs at least this many foreground pixels (before resampling) to be kept."""

Batch = dict[str, torch.Tensor]
PathsLike = str | os.PathLike | Sequence[str | os.PathLike]


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class BadFile:
    """A file that cannot be used, and why (``reason`` names the file)."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return self.reason


class BadInputError(ValueError):
    """Some input files cannot be used; :attr:`bad` lists them (each names its file)."""

    def __init__(self, message: str, bad: Sequence[BadFile]) -> None:
        super().__init__(message)
        self.bad = list(bad)


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return (
        path.is_file() and not name.startswith(".") and name.endswith(imagefiles.IMAGE_EXTENSIONS)
    )


def list_images(paths: PathsLike, *, name: str = "images") -> list[Path]:
    """The image files of a folder, a file, or a list of folders and files, in order.

    Folders give their image files (by extension, hidden files left out, not
    recursive) sorted by name; files are kept as given (an unknown extension is
    reported when the file is read).

    Raises
    ------
    ValueError
        A path does not exist, a folder holds no image files, or nothing was given.
    """
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if _is_image_file(f))
            if not found:
                others = sorted(f.name for f in p.iterdir() if not f.name.startswith("."))
                hint = f"; it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
                raise ValueError(
                    f"{p}: the folder holds no images ({', '.join(imagefiles.IMAGE_EXTENSIONS)})"
                    + (hint if others else " (it is empty)")
                )
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    if not files:
        raise ValueError(f"no {name} given")
    return files


def _shape_text(shape: tuple[int, ...]) -> str:
    n, h, w = shape
    return f"a 2D image of {h} x {w}" if n == 1 else f"a volume of {n} slices of {h} x {w}"


# ------------------------------------------------------------------------ processing


def _foreground(norm: np.ndarray, threshold: float) -> np.ndarray:
    """(n, H, W) bool foreground, cleaned slice by slice.

    The threshold is ``threshold`` or half the Otsu threshold of the normalised file,
    whichever is higher: a noisy background (or one of negative values, which
    normalisation maps to a few percent) then stays background.
    """

    otsu = float(threshold_otsu(norm)) if np.ptp(norm) > 0 else 0.0
    fg = norm > max(threshold, 0.5 * otsu)
    cross = ndi.generate_binary_structure(2, 1)
    for k in range(fg.shape[0]):
        if fg[k].any():
            fg[k] = ndi.binary_fill_holes(ndi.binary_opening(fg[k], cross))
    return fg


def _fit(stack: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Resample the (n, H, W) stack so that ``box`` (r0, r1, c0, c1, inclusive) fits size^2."""
    r0, r1, c0, c1 = box
    zoom = size / max(r1 - r0 + 1, c1 - c0 + 1)  # output pixels per input pixel
    centre_in = np.array([(r0 + r1) / 2.0, (c0 + c1) / 2.0])
    centre_out = (size - 1) / 2.0
    sigma = max(0.0, (1.0 / zoom - 1.0) / 2.0)  # anti-aliasing, as skimage.transform.rescale
    src = stack.astype(np.float32, copy=False)
    if sigma > 0:
        src = ndi.gaussian_filter(src, sigma=(0.0, sigma, sigma), mode="constant")
    out = ndi.affine_transform(
        src,
        np.array([1.0, 1.0 / zoom, 1.0 / zoom]),
        offset=np.array([0.0, *(centre_in - centre_out / zoom)]),
        output_shape=(stack.shape[0], size, size),
        order=1,
        mode="constant",
        cval=0.0,
    )
    return out.astype(np.float32, copy=False)


@dataclass
class _Record:
    """The kept slices of one file (or one pair of files), fitted to size x size."""

    file: int
    shape: tuple[int, int, int]
    images: list[np.ndarray]  # one (k, S, S) float32 per contrast
    masks: list[np.ndarray]  # one (k, S, S) uint8 per contrast
    slices: np.ndarray  # (k,) slice index in the file
    positions: np.ndarray  # (k,) in [0, 1] along the kept range


def _process(
    path: Path, stacks: list[np.ndarray], size: int, cfg: FolderConfig, file: int
) -> _Record:
    """Normalise, find the foreground, keep slices, crop and fit (module docstring)."""
    norms = [normalise_intensity(s) for s in stacks]
    fgs = [_foreground(n, cfg.foreground_threshold) for n in norms]
    union = np.logical_or.reduce(fgs)
    area = union.sum(axis=(1, 2))
    if area.max() < MIN_FOREGROUND_PIXELS:
        raise ValueError(
            f"{path}: no slice has {MIN_FOREGROUND_PIXELS} or more foreground pixels (the image "
            "is empty, constant or nearly so)"
        )
    keep = np.flatnonzero(
        (area >= cfg.min_foreground * area.max()) & (area >= MIN_FOREGROUND_PIXELS)
    )
    in_plane = union[keep].any(axis=0)
    rows, cols = np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))
    margin = int(round(cfg.margin * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)))
    box = (rows[0] - margin, rows[-1] + margin, cols[0] - margin, cols[-1] + margin)
    images = [np.clip(_fit(n[keep], box, size), 0.0, 1.0) for n in norms]
    masks = [(_fit(f[keep].astype(np.float32), box, size) >= 0.5).astype(np.uint8) for f in fgs]
    span = max(int(keep[-1] - keep[0]), 1)
    positions = (keep - keep[0]) / span if len(keep) > 1 else np.full(1, 0.5)
    return _Record(file, stacks[0].shape, images, masks, keep, positions.astype(np.float64))


def _load_groups(
    groups: list[list[Path]],
    *,
    size: int,
    config: FolderConfig,
    skip_bad: bool,
    allow_mixed_shapes: bool,
    names: list[str],
) -> tuple[list[_Record], list[BadFile]]:
    """Read file ``i`` of every group together (one group, or two paired contrasts)."""
    bad: list[BadFile] = []
    records: list[_Record] = []
    for i in range(len(groups[0])):
        paths = [g[i] for g in groups]
        stacks, errors = [], {}
        for p in paths:
            try:
                stacks.append(imagefiles.read_stack(p, axis=config.axis))
            except ValueError as exc:
                errors[p] = str(exc)
        if errors:
            first = next(iter(errors))
            bad.extend(
                BadFile(p, errors[p] if p in errors else f"{p}: left out with its partner {first}")
                for p in paths
            )
            continue
        if len(stacks) == 2 and stacks[0].shape != stacks[1].shape:
            a, b = paths
            reason = (
                f"{b}: is {_shape_text(stacks[1].shape)} but its partner {a} (matched by sorted "
                f"file order) is {_shape_text(stacks[0].shape)}; paired images must have one shape"
            )
            bad.extend([BadFile(b, reason), BadFile(a, f"{a}: left out with its partner {b}")])
            continue
        try:
            records.append(_process(paths[0], stacks, size, config, i))
        except ValueError as exc:
            bad.extend(BadFile(p, str(exc)) for p in paths[:1])
            bad.extend(BadFile(p, f"{p}: left out with its partner {paths[0]}") for p in paths[1:])
    if records and not allow_mixed_shapes:
        counts = Counter(r.shape for r in records)
        top = max(counts.values())
        reference = next(r.shape for r in records if counts[r.shape] == top)
        example = groups[0][next(r.file for r in records if r.shape == reference)]
        odd = [r for r in records if r.shape != reference]
        for r in odd:
            for g in groups:
                bad.append(
                    BadFile(
                        g[r.file],
                        f"{g[r.file]}: is {_shape_text(r.shape)}, but {top} of the files are "
                        f"{_shape_text(reference)} (e.g. {example.name}); mixed shapes usually "
                        "mean mixed resolutions or a wrong file (allow them with "
                        "allow_mixed_shapes / --allow-mixed-shapes)",
                    )
                )
        records = [r for r in records if r.shape == reference]
    total = len(groups[0]) * len(groups)
    if bad and not skip_bad:
        listing = "\n".join(f"  - {b}" for b in bad)
        good = total - len(bad)
        raise BadInputError(
            f"{' / '.join(names)}: {len(bad)} of {total} files cannot be used:\n{listing}\n"
            + (
                f"Fix or remove them, or skip them (skip_bad / --skip-bad) to go on with the "
                f"{good} good files."
                if good > 0
                else "No file can be used."
            ),
            bad,
        )
    if not records:
        listing = "\n".join(f"  - {b}" for b in bad)
        raise BadInputError(
            f"{' / '.join(names)}: none of the {total} files can be used:\n{listing}", bad
        )
    return records, bad


# ---------------------------------------------------------------------------- dataset


@dataclass(eq=False)
class SliceDataset(Dataset):
    """Foreground slices of the user's images, normalised and fitted to ``size x size``.

    A :class:`torch.utils.data.Dataset`: item ``i`` is a dict with ``image`` and
    ``mask`` (1, size, size) float32 tensors and the ``file`` and ``slice`` it came from.
    Build it with :meth:`from_paths` (one contrast) or :func:`load_paired` (two
    contrasts of the same subjects, slice-aligned).

    Attributes
    ----------
    images : numpy.ndarray
        (N, size, size) float32 in [0, 1].
    masks : numpy.ndarray
        (N, size, size) uint8 foreground (0/1).
    files : list of pathlib.Path
        Every file given, in order (``file_index`` points into it).
    file_index, slice_index : numpy.ndarray
        (N,) which file and which slice along the axis each item is.
    positions : numpy.ndarray
        (N,) relative position in [0, 1] of the slice among its file's kept slices.
    shapes : dict of int to tuple
        (slices, H, W) of every used file.
    bad : list of BadFile
        Files left out (``skip_bad=True``).
    name : str
        What the data are (for messages), e.g. ``"source"``.
    """

    images: np.ndarray
    masks: np.ndarray
    files: list[Path]
    file_index: np.ndarray
    slice_index: np.ndarray
    positions: np.ndarray
    shapes: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    bad: list[BadFile] = field(default_factory=list)
    name: str = "images"

    @classmethod
    def from_paths(
        cls,
        paths: PathsLike,
        *,
        size: int = DataConfig.size,
        config: FolderConfig | None = None,
        skip_bad: bool = False,
        allow_mixed_shapes: bool = False,
        name: str = "images",
    ) -> SliceDataset:
        """Load a folder, a file, or a list of them (see the module docstring).

        Raises
        ------
        ValueError
            Missing path or empty folder.
        BadInputError
            Some files cannot be used and ``skip_bad`` is false, or none can be used.
        """
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}")
        files = list_images(paths, name=name)
        records, bad = _load_groups(
            [files],
            size=size,
            config=config or FolderConfig(),
            skip_bad=skip_bad,
            allow_mixed_shapes=allow_mixed_shapes,
            names=[name],
        )
        return _from_records(records, 0, files, bad, name)

    @property
    def size(self) -> int:
        """Side of every slice in pixels."""
        return int(self.images.shape[-1])

    @property
    def used_files(self) -> list[Path]:
        """The files that contribute slices."""
        return [self.files[i] for i in sorted(self.shapes)]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {
            "image": torch.from_numpy(self.images[index][None].copy()),
            "mask": torch.from_numpy(self.masks[index][None].astype(np.float32)),
            "file": int(self.file_index[index]),
            "slice": int(self.slice_index[index]),
        }

    def describe(self) -> str:
        """One line: how many slices from how many files, and what was skipped."""
        text = (
            f"{self.name}: {len(self)} slices of {self.size} x {self.size} px from "
            f"{len(self.shapes)} file(s)"
        )
        if self.bad:
            text += f"; {len(self.bad)} bad file(s) skipped"
        return text


def _from_records(
    records: list[_Record], group: int, files: list[Path], bad: list[BadFile], name: str
) -> SliceDataset:
    return SliceDataset(
        images=np.concatenate([r.images[group] for r in records]),
        masks=np.concatenate([r.masks[group] for r in records]),
        files=list(files),
        file_index=np.concatenate([np.full(len(r.slices), r.file) for r in records]),
        slice_index=np.concatenate([r.slices for r in records]),
        positions=np.concatenate([r.positions for r in records]),
        shapes={r.file: r.shape for r in records},
        bad=[b for b in bad if b.path in set(files)],
        name=name,
    )


def load_paired(
    paths_a: PathsLike,
    paths_b: PathsLike,
    *,
    size: int = DataConfig.size,
    config: FolderConfig | None = None,
    skip_bad: bool = False,
    allow_mixed_shapes: bool = False,
    names: tuple[str, str] = ("contrast A", "contrast B"),
) -> tuple[SliceDataset, SliceDataset]:
    """Two slice-aligned datasets of two contrasts of the same subjects.

    File ``i`` of ``paths_a`` (sorted, as :func:`list_images`) is matched with file
    ``i`` of ``paths_b``; both must have one shape. They share the kept slices (the
    union of both foregrounds) and the crop box, so item ``j`` of one is voxel-aligned
    with item ``j`` of the other. A bad file leaves its partner out too.

    Raises
    ------
    ValueError
        The two lists hold different numbers of files (they cannot be paired; use
        unpaired target pairs instead), or as :meth:`SliceDataset.from_paths`.
    """
    files_a = list_images(paths_a, name=names[0])
    files_b = list_images(paths_b, name=names[1])
    if len(files_a) != len(files_b):
        raise ValueError(
            f"{names[0]} has {len(files_a)} files but {names[1]} has {len(files_b)}: paired "
            "folders are matched file by file in sorted order, so the counts must be equal "
            "(use unpaired target pairs for folders of different subjects)"
        )
    records, bad = _load_groups(
        [files_a, files_b],
        size=size,
        config=config or FolderConfig(),
        skip_bad=skip_bad,
        allow_mixed_shapes=allow_mixed_shapes,
        names=list(names),
    )
    return (
        _from_records(records, 0, files_a, bad, names[0]),
        _from_records(records, 1, files_b, bad, names[1]),
    )


def split_holdout(
    dataset: SliceDataset, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """Indices for training and for the evaluation at the end, and how they were split.

    With two or more files, ``round(fraction * files)`` whole files (at least one, and
    never all) are held out, chosen with ``seed``: test anatomy is never trained on.
    With one file, its last ``round(fraction * slices)`` kept slices (a contiguous
    block) are held out; a single 2D image leaves nothing to hold out. ``fraction = 0``
    holds out nothing.
    """
    everything = np.arange(len(dataset))
    files = np.unique(dataset.file_index)
    if fraction <= 0:
        return everything, everything[:0], "nothing held out"
    if len(files) >= 2:
        n_val = min(max(1, int(round(fraction * len(files)))), len(files) - 1)
        held = np.random.default_rng([seed, 7]).permutation(files)[:n_val]
        val = np.isin(dataset.file_index, held)
        names = ", ".join(dataset.files[i].name for i in sorted(held)[:3])
        more = " ..." if n_val > 3 else ""
        return (
            np.flatnonzero(~val),
            np.flatnonzero(val),
            f"{n_val} of {len(files)} files held out for evaluation ({names}{more})",
        )
    if len(dataset) < 2:
        return everything, everything[:0], "a single image: nothing to hold out, no evaluation"
    n_val = min(max(1, int(round(fraction * len(dataset)))), len(dataset) - 1)
    return (
        everything[:-n_val],
        everything[-n_val:],
        f"one file: its last {n_val} of {len(dataset)} kept slices held out for evaluation",
    )


def shard(indices, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's part of ``indices`` (a :class:`~torch.utils.data.DistributedSampler`
    without shuffling: every ``world_size``-th item from ``rank``; padded by repetition
    so that every rank gets the same number)."""
    idx = np.asarray(indices, dtype=np.int64)
    if world_size <= 1:
        return idx
    sampler: DistributedSampler[int] = DistributedSampler(
        range(idx.size),  # type: ignore[arg-type]  # anything with a length
        num_replicas=world_size,
        rank=rank,
        shuffle=False,
    )
    return idx[np.fromiter(iter(sampler), dtype=np.int64)]


# ------------------------------------------------------------------------------ pairs


def synthetic_pair(
    image_a: np.ndarray,
    mask_a: np.ndarray,
    image_b: np.ndarray,
    mask_b: np.ndarray,
    rng: np.random.Generator,
    config: DataConfig,
) -> dict[str, np.ndarray]:
    """One labelled pair as :func:`~napari_discreg.core.data.template.make_pair` makes it.

    ``img_a``/``img_b`` get independent bias fields, blur and noise; ``u`` comes from
    :func:`~napari_discreg.core.data.template.random_field`; ``fixed = warp(img_a, u)`` (noise
    added after the warp), ``moving = img_b``. For mono-modal pairs pass the same
    slice twice.

    Returns
    -------
    dict
        ``fixed``, ``moving`` (H, W) float32 in [0, 1]; ``displacement`` (2, H, W)
        float32 pixels; ``mask`` (H, W) float32, ``mask_a`` warped into the fixed frame.
    """
    a_clean, a_noise = appearance(image_a, mask_a, rng, config)
    b_clean, b_noise = appearance(image_b, mask_b, rng, config)
    fixed, moving, u = deform_pair(a_clean, a_noise, b_clean, b_noise, rng, config)
    mask = warp_numpy(mask_a.astype(np.float32), u, order=0) > 0.5
    return {
        "fixed": fixed.astype(np.float32, copy=False),
        "moving": moving.astype(np.float32, copy=False),
        "displacement": u,
        "mask": mask.astype(np.float32),
    }


class PairMaker:
    """Makes synthetic pairs from slice datasets (module docstring, *Pairs*).

    Parameters
    ----------
    fixed : SliceDataset
        Images of the fixed contrast (the only one for mono-modal source pairs).
    moving : SliceDataset, optional
        Images of the moving contrast, for target pairs.
    pairing : {"mono", "paired", "unpaired"}
        ``"mono"``: the moving image is the fixed slice itself (source). ``"paired"``:
        item ``i`` of ``moving`` (slice-aligned with ``fixed``, see
        :func:`load_paired`). ``"unpaired"``: a random file of ``moving``, the slice at
        the nearest relative position.
    config : DataConfig
        Deformation and appearance settings.
    """

    def __init__(
        self,
        fixed: SliceDataset,
        moving: SliceDataset | None = None,
        *,
        pairing: str = "mono",
        config: DataConfig | None = None,
    ) -> None:
        if pairing not in ("mono", "paired", "unpaired"):
            raise ValueError(f"pairing must be 'mono', 'paired' or 'unpaired', got {pairing!r}")
        if pairing != "mono" and moving is None:
            raise ValueError(f"{pairing} pairs need a moving dataset")
        if moving is not None and moving.size != fixed.size:
            raise ValueError(f"fixed slices are {fixed.size} px but moving {moving.size} px")
        if pairing == "paired" and len(moving) != len(fixed):  # type: ignore[arg-type]
            raise ValueError("paired datasets must be slice-aligned (use load_paired)")
        self.fixed, self.moving, self.pairing = fixed, moving, pairing
        self.config = config or DataConfig(size=fixed.size)
        self.has_truth = pairing != "unpaired"
        if pairing == "unpaired":
            assert moving is not None
            self._by_file = [
                np.flatnonzero(moving.file_index == f) for f in np.unique(moving.file_index)
            ]

    def partner(self, index: int, rng: np.random.Generator) -> int:
        """Index into the moving dataset of the partner of fixed item ``index``."""
        if self.pairing != "unpaired":
            return int(index)
        assert self.moving is not None
        items = self._by_file[int(rng.integers(len(self._by_file)))]
        gap = np.abs(self.moving.positions[items] - self.fixed.positions[index])
        return int(items[int(np.argmin(gap))])

    def make(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The pair of fixed item ``index`` (see :func:`synthetic_pair`)."""
        a, ma = self.fixed.images[index], self.fixed.masks[index]
        if self.pairing == "mono":
            b, mb = a, ma
        else:
            assert self.moving is not None
            j = self.partner(index, rng)
            b, mb = self.moving.images[j], self.moving.masks[j]
        return synthetic_pair(a, ma, b, mb, rng, self.config)

    def describe(self) -> str:
        """What pairs this maker makes, in one sentence."""
        if self.pairing == "mono":
            return f"mono-modal pairs of {self.fixed.name} slices"
        assert self.moving is not None
        if self.pairing == "paired":
            return (
                f"paired: each {self.fixed.name} slice vs the same slice of the {self.moving.name} "
                "file of the same subject (files matched in sorted order), with a synthetic "
                "deformation as ground truth"
            )
        return (
            f"unpaired: each {self.fixed.name} slice vs the slice of a random {self.moving.name} "
            "file at the same relative position, plus a synthetic deformation; no ground truth "
            "(inter-subject pairs)"
        )


def _collate(items: list[dict[str, np.ndarray]]) -> Batch:
    out = {}
    for key in ("fixed", "moving", "displacement", "mask"):
        arr = np.stack([it[key] for it in items]).astype(np.float32, copy=False)
        out[key] = torch.from_numpy(arr[:, None] if arr.ndim == 3 else arr)
    return out


class _Steps(Dataset):
    """Batch ``step`` as dataset item ``step`` (lets a DataLoader make batches in workers)."""

    def __init__(self, batches: PairBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:  # pragma: no cover - endless; DataLoader never needs it here
        return 2**62

    def __getitem__(self, step: int) -> Batch:
        return self.batches.batch(step)


class PairBatches:
    """Endless labelled batches of synthetic pairs, one shard per rank.

    Batch ``step`` depends only on ``(seed, rank, step)``: the slices come in the order
    of a :class:`~torch.utils.data.DistributedSampler` (shuffled every epoch, a
    disjoint shard per rank) and all other randomness from
    ``numpy.random.default_rng([seed, rank, step])``.

    Parameters
    ----------
    maker : PairMaker
        What pairs to make.
    indices : array_like of int, optional
        Items of ``maker.fixed`` to use (e.g. the training split); default all.
    batch_size : int
        Pairs per batch (per rank).
    seed, rank, world_size : int
        Shuffling seed and this process's shard.
    """

    def __init__(
        self,
        maker: PairMaker,
        indices=None,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.maker = maker
        self.indices = (
            np.arange(len(maker.fixed)) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        if self.indices.size == 0:
            raise ValueError(f"no {maker.fixed.name} slices to make pairs from")
        self.batch_size, self.seed, self.rank = int(batch_size), int(seed), int(rank)
        self.sampler: DistributedSampler[int] = DistributedSampler(
            Subset(maker.fixed, self.indices.tolist()),
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
        )
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self.sampler.set_epoch(epoch)
            self._orders = {epoch: self.indices[np.fromiter(iter(self.sampler), dtype=np.int64)]}
        return self._orders[epoch]

    def items(self, step: int) -> np.ndarray:
        """Indices into ``maker.fixed`` of the pairs of batch ``step``."""
        n = len(self.sampler)
        positions = step * self.batch_size + np.arange(self.batch_size)
        return np.array([self._order(int(p // n))[p % n] for p in positions], dtype=np.int64)

    def batch(self, step: int) -> Batch:
        """Batch ``step`` on the CPU: ``fixed``, ``moving``, ``mask`` (B, 1, H, W),
        ``displacement`` (B, 2, H, W), all float32."""
        rng = np.random.default_rng([self.seed, self.rank, int(step)])
        return _collate([self.maker.make(int(i), rng) for i in self.items(step)])

    def iterate(self, start_step: int = 0, *, device=None, workers: int = 0) -> Iterator[Batch]:
        """Batches ``start_step, start_step + 1, ...`` moved to ``device``.

        ``workers > 0`` makes them in that many background processes
        (:class:`torch.utils.data.DataLoader`), in the same order.
        """
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if workers > 0:
            loader = torch.utils.data.DataLoader(
                _Steps(self),
                batch_size=None,
                sampler=itertools.count(int(start_step)),  # type: ignore[arg-type]
                num_workers=workers,
                pin_memory=dev.type == "cuda",
            )
            source: Iterator[Batch] = iter(loader)
        else:
            source = (self.batch(s) for s in itertools.count(int(start_step)))
        for batch in source:
            yield {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------- fixed pair sets


@dataclass
class PairSet:
    """A fixed set of pairs: the unlabelled target pool, or evaluation pairs.

    ``displacement`` is the ground truth (None for unpaired target pairs).
    """

    fixed: np.ndarray
    moving: np.ndarray
    mask: np.ndarray
    displacement: np.ndarray | None
    description: str

    def __len__(self) -> int:
        return int(self.fixed.shape[0])


def make_pairs(
    maker: PairMaker, indices, n: int, *, seed: int = 0, stream: Sequence[int] = ()
) -> PairSet:
    """``n`` pairs from the items ``indices`` of ``maker.fixed`` (cycled when ``n`` is larger).

    The items are taken in a seeded random order and pair ``k`` draws from
    ``numpy.random.default_rng([seed, *stream, k])``: the same arguments give the same
    pairs (e.g. evaluation pairs before and after adaptation).
    """
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0 or n < 1:
        raise ValueError("make_pairs needs at least one item and n >= 1")
    order = np.random.default_rng([seed, *stream, 2**31 - 1]).permutation(idx)
    items = [
        maker.make(int(order[k % order.size]), np.random.default_rng([seed, *stream, k]))
        for k in range(n)
    ]
    stack = {k: np.stack([it[k] for it in items]) for k in items[0]}
    return PairSet(
        fixed=stack["fixed"],
        moving=stack["moving"],
        mask=stack["mask"],
        displacement=stack["displacement"] if maker.has_truth else None,
        description=f"{n} {maker.describe()}",
    )


def evaluate_pairs(model, pairs: PairSet) -> dict[str, dict[str, float]]:
    """Label accuracy, end-point error (px) and folding of the identity and of ``model``.

    Over each pair's foreground, with the ground truth of ``pairs`` (which must have
    one); the user's images carry no tissue labels, so there is no Dice.
    """

    if pairs.displacement is None:
        raise ValueError("these pairs have no ground truth (unpaired): nothing to evaluate")
    zeros = np.zeros(pairs.fixed.shape[1:], dtype=np.uint8)
    items = [
        Pair(
            fixed=pairs.fixed[i],
            moving=pairs.moving[i],
            displacement=pairs.displacement[i],
            fixed_labels=zeros,
            moving_labels=zeros,
            mask=pairs.mask[i],
            fixed_contrast="fixed",
            moving_contrast="moving",
            index=i,
        )
        for i in range(len(pairs))
    ]
    cfg = model.config
    keys = ("label_accuracy", "epe", "folding")
    ident = summarise(identity_metrics(items, cfg.stride, cfg.num_labels, cfg.capture_range))
    mod = summarise(evaluate_model(model, items))
    return {
        "identity": {k: ident[k] for k in keys},
        "model": {k: mod[k] for k in (*keys, "seconds")},
    }
