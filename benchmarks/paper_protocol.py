"""The MIDL 2020 paper's table in its own protocol: per-patch-pair displacement classes.

    python benchmarks/paper_protocol.py                 # 3 seeds, writes docs/
    python benchmarks/paper_protocol.py --quick         # smoke run (< 60 s)
    python benchmarks/paper_protocol.py --tune          # settings on the validation split

Heinrich & Hansen, "Unsupervised learning of multimodal image registration using domain
adaptation with projected Earth Mover's discrepancies" (MIDL 2020), as in the talk's
slides: every sample is a pair of patches (fixed, moving) whose moving patch is cut at
one of 5 x 5 displacements ``{-2s, -s, 0, s, 2s}`` per axis from the fixed patch; a small
CNN classifies the pair into these 25 classes. Source: T1 vs T1 patch pairs with labels;
target: T1 vs T2-like pairs, unlabelled for adaptation. Rows: no registration (the share
of test pairs in the zero class), source-only, and maximum classifier discrepancy (Saito
et al. 2018) with the L1, SWD, p-EMD (marginals) and p-EMD (16+) discrepancies of
:mod:`napari_discreg.core.learning.discrepancy`, all from the same source weights per seed.

Splits of the template's axial slices: source pairs and unlabelled target pairs from
slices [30, 80), validation pairs (``--tune`` only) from [80, 96), test pairs from the
test range [96, 136) of ``DataConfig`` with a fixed seed. No test label is used for any
choice: the adapted model is the one after the last iteration (no keep-best), and the
settings were chosen with ``--tune`` on the validation split.

Writes ``<out-dir>/paper_protocol.json`` and the "paper-protocol" section of
``<out-dir>/benchmarks.md``; ``--tune`` writes the "tuning" entry of the same json (kept
by later full runs and shown in the section).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _protocol import update_section
from torch import nn

from napari_discreg.core.config import DataConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.learning.discrepancy import Discrepancy, discrepancy_fn

DOCS = Path(__file__).resolve().parents[1] / "docs"
SECTION = "paper-protocol"
K = 5  # classes per axis
KINDS = ("l1", "swd", "pemd", "pemd16+")
ROW_NAMES = {
    "l1": "MCD-L1",
    "swd": "MCD-SWD",
    "pemd": "MCD-p-EMD (marginals)",
    "pemd16+": "MCD-p-EMD (16+)",
}
ROWS = ("no registration", "source-only", *ROW_NAMES.values())
PAPER = {  # label accuracy in %, from the paper's table
    "no registration": 4.0,
    "source-only": 31.9,
    "MCD-SWD": 33.2,
    "MCD-p-EMD (16+)": 44.1,
}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Protocol:
    """How patch pairs are made."""

    size: int = 192  # slices are size x size px
    patch: int = 72  # patches are patch x patch px (feature map patch / 4 = 18)
    step: int = 8  # s: class displacements {-2s, -s, 0, s, 2s} px per axis
    jitter: int = 2  # sub-class shift: an integer uniform in [-jitter, jitter] per axis
    warp: float = 1.5  # largest displacement (px) of a smooth random field per rendering
    renders: int = 4  # renderings (own bias field, noise, warp) per slice and contrast
    train_slices: tuple[int, int] = (30, 80)
    val_slices: tuple[int, int] = (80, 96)
    test_slices: tuple[int, int] = DataConfig.test_slices
    target_contrast: str = "t2"
    n_val: int = 1000
    n_test: int = 1000
    test_seed: int = 123
    val_seed: int = 77


@dataclass(frozen=True)
class Schedule:
    """How the networks are trained."""

    source_iters: int = 1000
    source_lr: float = 2e-3
    batch: int = 32  # source pairs per batch (and target pairs per MCD batch)
    mcd_iters: int = 450
    mcd_lr: float = 2e-4
    discrepancy_weight: float = 1.0  # lambda in step B (and step C)
    generator_updates: int = 1  # n, step-C updates of G per iteration
    supervise: str = "both"  # "both": both heads supervised; "f1": only head 1 (the paper)
    logit_scale: float = 0.1
    swd_projections: int = 128  # random directions of the SWD per iteration
    # per-discrepancy lambda, overriding discrepancy_weight: (("swd", 1000.0), ...)
    kind_weights: tuple = ()


def parse_kind_weights(words: list[str]) -> tuple[tuple[str, float], ...]:
    """``["l1=30", "swd=100"]`` -> ``(("l1", 30.0), ("swd", 100.0))``."""
    out = []
    for word in words:
        kind, sep, value = word.partition("=")
        if not sep or kind not in KINDS:
            raise SystemExit(
                f"--kind-weights: expected KIND=LAMBDA with KIND in {KINDS}, got {word!r}"
            )
        try:
            lam = float(value)
        except ValueError:
            raise SystemExit(f"--kind-weights: {value!r} is not a number") from None
        if not lam >= 0:
            raise SystemExit(f"--kind-weights: lambda must be >= 0, got {lam}")
        out.append((kind, lam))
    return tuple(out)


def _lambda_text(sched: dict) -> str:
    """The table's lambdas: the shared one, and each discrepancy's own where given."""
    own = [tuple(kw) for kw in sched.get("kind_weights") or ()]
    if not own:
        return f"{sched['discrepancy_weight']}"
    names = {"l1": "L1", "swd": "SWD", "pemd": "p-EMD (marginals)", "pemd16+": "p-EMD (16+)"}
    given = ", ".join(f"{names.get(k, k)} {w:g}" for k, w in own)
    return f"{sched['discrepancy_weight']} ({given}: their own weights, chosen on validation)"


# --------------------------------------------------------------------------- patch pairs


def class_offsets(step: int) -> np.ndarray:
    """The K = 5 displacements per axis, ``step * (-2, -1, 0, 1, 2)`` px."""
    return step * np.arange(-(K // 2), K // 2 + 1)


def crop(image: np.ndarray, centre_row: int, centre_col: int, size: int) -> np.ndarray:
    """The ``size x size`` window of ``image`` whose top-left pixel is ``centre - size // 2``,
    zero outside the image."""
    top, left = int(centre_row) - size // 2, int(centre_col) - size // 2
    out = np.zeros((size, size), dtype=np.float32)
    h, w = image.shape
    r0, r1 = max(top, 0), min(top + size, h)
    c0, c1 = max(left, 0), min(left + size, w)
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    return out


@dataclass
class SliceBank:
    """Rendered slices to cut patch pairs from: ``images[contrast]`` is
    ``(n_slices, renders, size, size)``; ``masks`` the brain masks ``(n_slices, size, size)``."""

    slices: np.ndarray
    images: dict[str, np.ndarray]
    masks: np.ndarray
    foreground: list[np.ndarray] = field(default_factory=list)  # (n_i, 2) pixel lists

    def __post_init__(self) -> None:
        self.foreground = [np.argwhere(m > 0) for m in self.masks]


def build_bank(
    template: data.Template,
    slices: tuple[int, int],
    contrasts: tuple[str, ...],
    rng: np.random.Generator,
    *,
    renders: int,
    warp: float,
    config: DataConfig,
) -> SliceBank:
    """Render every slice of ``[lo, hi)`` ``renders`` times in each contrast with
    :func:`napari_discreg.core.data.template.synthesize_contrast` (its own bias field and noise
    each time), each rendering warped by its own smooth random field of at most ``warp``
    px (none for ``warp = 0``)."""
    idx = np.arange(*slices)
    images = {
        c: np.zeros((len(idx), renders, template.size, template.size), np.float32)
        for c in contrasts
    }
    for i, s in enumerate(idx):
        for c in contrasts:
            for r in range(renders):
                img = data.synthesize_contrast(template, int(s), c, rng, config)
                if warp > 0:
                    u = data.random_field(
                        img.shape, rng, max_displacement=warp, smoothness=12.0, affine_scale=0.0
                    )
                    img = data.warp_numpy(img, u)
                images[c][i, r] = img
    return SliceBank(idx, images, np.asarray(template.mask[idx]))


def sample_pairs(
    bank: SliceBank,
    n: int,
    fixed_contrast: str,
    moving_contrast: str,
    rng: np.random.Generator,
    *,
    patch: int,
    step: int,
    jitter: int,
) -> dict[str, np.ndarray]:
    """``n`` random patch pairs with their classes.

    Each pair picks a slice, a patch centre ``c`` among the slice's brain pixels, a
    class ``(i, j)`` and a jitter ``(a, b)``; the fixed patch is the window at ``c`` of a
    rendering of the slice in ``fixed_contrast``, the moving patch the window at
    ``c + d`` with ``d = (offset_i + a, offset_j + b)`` of another rendering (when the
    contrasts match and there is more than one) in ``moving_contrast``. The label is
    ``i * K + j``: row class first, as the ``(K, K)`` histograms of the discrepancies.

    Returns
    -------
    dict
        ``fixed``, ``moving`` ``(n, 1, patch, patch)`` float32; ``label`` ``(n,)``
        int64; ``shift`` ``(n, 2)`` = ``d``; ``centre`` ``(n, 2)``; ``slice`` ``(n,)``
        (template index); ``render`` ``(n, 2)`` (fixed, moving rendering).
    """
    offsets = class_offsets(step)
    renders = bank.images[fixed_contrast].shape[1]
    out = {
        "fixed": np.zeros((n, 1, patch, patch), np.float32),
        "moving": np.zeros((n, 1, patch, patch), np.float32),
        "label": np.zeros(n, np.int64),
        "shift": np.zeros((n, 2), np.int64),
        "centre": np.zeros((n, 2), np.int64),
        "slice": np.zeros(n, np.int64),
        "render": np.zeros((n, 2), np.int64),
    }
    for k in range(n):
        s = int(rng.integers(len(bank.slices)))
        fg = bank.foreground[s]
        centre = fg[int(rng.integers(len(fg)))]
        ci, cj = (int(v) for v in rng.integers(K, size=2))
        a, b = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
        shift = np.array([offsets[ci] + a, offsets[cj] + b])
        rf = int(rng.integers(renders))
        rm = int(rng.integers(renders))
        if fixed_contrast == moving_contrast and renders > 1 and rm == rf:
            rm = (rf + 1 + int(rng.integers(renders - 1))) % renders
        out["fixed"][k, 0] = crop(bank.images[fixed_contrast][s, rf], *centre, patch)
        out["moving"][k, 0] = crop(bank.images[moving_contrast][s, rm], *(centre + shift), patch)
        out["label"][k] = ci * K + cj
        out["shift"][k] = shift
        out["centre"][k] = centre
        out["slice"][k] = bank.slices[s]
        out["render"][k] = (rf, rm)
    return out


def to_tensors(pairs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(pairs["fixed"]),
        torch.from_numpy(pairs["moving"]),
        torch.from_numpy(pairs["label"]),
    )


# --------------------------------------------------------------------------- network


def _block(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2),
        nn.InstanceNorm2d(cout, affine=True),
        nn.PReLU(cout),
    )


class PatchNet(nn.Module):
    """G: 4 blocks (3 x 3 conv, instance norm, PReLU; the first two with stride 2), a
    72 x 72 patch -> 16 x 18 x 18 features (12.6k weights); F1, F2: 3 blocks each on the
    concatenated fixed and moving features (32 x 18 x 18) -> 25 logits (68k weights each)."""

    def __init__(self) -> None:
        super().__init__()
        self.G = nn.Sequential(_block(1, 16, 2), _block(16, 24, 2), _block(24, 24), _block(24, 16))
        self.F1 = self._head()
        self.F2 = self._head()

    @staticmethod
    def _head() -> nn.Sequential:
        return nn.Sequential(
            _block(32, 32, 2),  # 18 -> 9
            _block(32, 64, 2),  # 9 -> 5
            nn.Conv2d(64, K * K, 5),  # 5 -> 1
            nn.Flatten(),
        )

    def features(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        n = fixed.shape[0]
        feats = self.G(torch.cat([fixed, moving]))
        return torch.cat([feats[:n], feats[n:]], 1)

    def heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.F1(feats), self.F2(feats)


def count_weights(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def histograms(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """``(N, 25)`` logits -> ``(N, K, K)`` probability histograms (row class first)."""
    return torch.softmax(scale * logits, -1).view(-1, K, K)


def supervised_loss(
    heads: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, sched: Schedule
) -> torch.Tensor:
    loss = F.cross_entropy(sched.logit_scale * heads[0], labels)
    if sched.supervise == "both":
        loss = loss + F.cross_entropy(sched.logit_scale * heads[1], labels)
    return loss


@torch.no_grad()
def predict(
    net: PatchNet, fixed: torch.Tensor, moving: torch.Tensor, sched: Schedule, chunk: int = 250
) -> torch.Tensor:
    """Predicted classes: head 1's argmax (``supervise="f1"``) or that of the mean of both
    heads' probabilities (``"both"``)."""
    was = net.training
    net.eval()
    out = []
    for i in range(0, fixed.shape[0], chunk):
        l1, l2 = net.heads(net.features(fixed[i : i + chunk], moving[i : i + chunk]))
        prob = torch.softmax(sched.logit_scale * l1, -1)
        if sched.supervise == "both":
            prob = 0.5 * (prob + torch.softmax(sched.logit_scale * l2, -1))
        out.append(prob.argmax(-1))
    net.train(was)
    return torch.cat(out)


def accuracy(net: PatchNet, pairs, sched: Schedule) -> float:
    fixed, moving, labels = pairs
    return float((predict(net, fixed, moving, sched) == labels).float().mean())


# --------------------------------------------------------------------------- training


class Source:
    """Endless labelled source batches (T1 vs T1) cut from a slice bank."""

    def __init__(self, bank: SliceBank, proto: Protocol, batch: int, rng: np.random.Generator):
        self.bank, self.proto, self.batch, self.rng = bank, proto, batch, rng

    def __next__(self):
        p = self.proto
        pairs = sample_pairs(
            self.bank, self.batch, "t1", "t1", self.rng, patch=p.patch, step=p.step, jitter=p.jitter
        )
        return to_tensors(pairs)


def train_source(bank: SliceBank, proto: Protocol, sched: Schedule, seed: int) -> PatchNet:
    torch.manual_seed(seed)
    net = PatchNet()
    params = list(net.G.parameters()) + list(net.F1.parameters())
    if sched.supervise == "both":
        params += list(net.F2.parameters())
    opt = torch.optim.Adam(params, lr=sched.source_lr)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=sched.source_lr, total_steps=max(sched.source_iters, 1), pct_start=0.1
    )
    source = Source(bank, proto, sched.batch, np.random.default_rng([seed, 1]))
    net.train()
    for _ in range(sched.source_iters):
        fixed, moving, labels = next(source)
        loss = supervised_loss(net.heads(net.features(fixed, moving)), labels, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
    return net


def mcd(
    base: PatchNet,
    kind: str,
    bank: SliceBank,
    target: tuple[torch.Tensor, torch.Tensor],
    proto: Protocol,
    sched: Schedule,
    seed: int,
    iters: int | None = None,
    probe=None,
    probe_every: int = 0,
) -> tuple[PatchNet, list[dict]]:
    """Maximum classifier discrepancy from a copy of ``base``; returns the last weights.
    ``probe(net)`` (a score, e.g. validation accuracy) is logged every ``probe_every``
    iterations when given; it draws no random number, so the run is unchanged."""
    kind = Discrepancy.parse(kind).value
    net = copy.deepcopy(base).train()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2, KINDS.index(kind) if kind in KINDS else 9])
    gen = torch.Generator().manual_seed(seed)
    source = Source(bank, proto, sched.batch, rng)
    opt_g = torch.optim.Adam(net.G.parameters(), lr=sched.mcd_lr)
    head_params = list(net.F1.parameters()) + list(net.F2.parameters())
    opt_f = torch.optim.Adam(head_params, lr=sched.mcd_lr)
    lam = dict(sched.kind_weights).get(kind, sched.discrepancy_weight)
    scale = sched.logit_scale
    t_fixed, t_moving = target
    log = []
    for it in range(sched.mcd_iters if iters is None else iters):
        fixed, moving, labels = next(source)
        idx = torch.from_numpy(rng.integers(0, t_fixed.shape[0], size=sched.batch))
        tf, tm = t_fixed[idx], t_moving[idx]
        if kind in ("swd", "pemd16+"):  # fresh directions, the same in steps B and C
            seed_it = int(torch.randint(2**31 - 1, (1,), generator=gen))
            if kind == "swd":
                d = discrepancy_fn(kind, seed=seed_it, num_projections=sched.swd_projections)
            else:
                d = discrepancy_fn(kind, seed=seed_it)
        else:
            d = discrepancy_fn(kind)
        # A: G, F1, F2 on the source cross-entropy
        loss_a = supervised_loss(net.heads(net.features(fixed, moving)), labels, sched)
        opt_g.zero_grad(set_to_none=True)
        opt_f.zero_grad(set_to_none=True)
        loss_a.backward()
        opt_g.step()
        opt_f.step()
        # B: G frozen; the heads keep the source right and disagree on the target
        with torch.no_grad():
            fs, ft = net.features(fixed, moving), net.features(tf, tm)
        h1, h2 = net.heads(ft)
        disc_b = d(histograms(h1, scale), histograms(h2, scale))
        loss_b = supervised_loss(net.heads(fs), labels, sched) - lam * disc_b
        opt_f.zero_grad(set_to_none=True)
        loss_b.backward()
        opt_f.step()
        # C: heads frozen; G makes them agree on the target
        for p in head_params:
            p.requires_grad_(False)
        for _ in range(sched.generator_updates):
            h1, h2 = net.heads(net.features(tf, tm))
            disc_c = d(histograms(h1, scale), histograms(h2, scale))
            opt_g.zero_grad(set_to_none=True)
            (lam * disc_c).backward()
            opt_g.step()
        for p in head_params:
            p.requires_grad_(True)
        values = (float(loss_a.detach()), float(disc_b.detach()), float(disc_c.detach()))
        if not all(np.isfinite(values)):
            raise FloatingPointError(f"MCD-{kind} diverged at iteration {it + 1}")
        if (it + 1) % 25 == 0:
            log.append(
                {
                    "iteration": it + 1,
                    "source_ce": values[0],
                    "disc_b": values[1],
                    "disc_c": values[2],
                }
            )
        if probe is not None and probe_every > 0 and (it + 1) % probe_every == 0:
            log.append({"iteration": it + 1, "probe": float(probe(net))})
    return net.eval(), log


# --------------------------------------------------------------------------- runs


@dataclass
class Data:
    train: SliceBank
    target: tuple[torch.Tensor, torch.Tensor]  # unlabelled target pairs (train slices)
    evaluation: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # labelled test or val pairs


def make_data(proto: Protocol, n_target: int, *, split: str = "test") -> Data:
    """The training slice bank, the unlabelled target pairs and the labelled T1 vs target
    pairs of ``split``: ``"test"`` (the table) or ``"val"`` (``--tune``; then the test
    slices are not even rendered)."""
    cfg = DataConfig(size=proto.size)
    template = data.load_template(proto.size)
    contrasts = ("t1", proto.target_contrast)
    kw = {"renders": proto.renders, "warp": proto.warp, "config": cfg}
    pk = {"patch": proto.patch, "step": proto.step, "jitter": proto.jitter}
    train = build_bank(template, proto.train_slices, contrasts, np.random.default_rng(2020), **kw)
    target = sample_pairs(
        train, n_target, "t1", proto.target_contrast, np.random.default_rng(2021), **pk
    )
    if split == "test":
        slices, seed, n = proto.test_slices, proto.test_seed, proto.n_test
    elif split == "val":
        slices, seed, n = proto.val_slices, proto.val_seed, proto.n_val
    else:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    bank = build_bank(template, slices, contrasts, np.random.default_rng(seed), **kw)
    pairs = sample_pairs(
        bank, n, "t1", proto.target_contrast, np.random.default_rng([seed, 1]), **pk
    )
    fixed, moving, _ = to_tensors(target)  # the target labels are dropped here
    return Data(train, (fixed, moving), to_tensors(pairs))


def run_table(
    proto: Protocol, sched: Schedule, seeds, n_target: int, say=print
) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    d = make_data(proto, n_target, split="test")
    test_labels = d.evaluation[2].numpy()
    say(f"data: {time.perf_counter() - t0:.1f} s")
    zero_class = (K * K) // 2
    rows: dict[str, list[float]] = {name: [] for name in ROWS}
    seconds: dict[str, list[float]] = {name: [] for name in ROWS[1:]}
    logs = {}
    for seed in seeds:
        rows["no registration"].append(float(np.mean(test_labels == zero_class)))
        t = time.perf_counter()
        base = train_source(d.train, proto, sched, seed)
        seconds["source-only"].append(time.perf_counter() - t)
        rows["source-only"].append(accuracy(base, d.evaluation, sched))
        say(
            f"seed {seed} source-only {100 * rows['source-only'][-1]:.1f} % ({seconds['source-only'][-1]:.0f} s)"
        )
        for kind in KINDS:
            t = time.perf_counter()
            net, log = mcd(base, kind, d.train, d.target, proto, sched, seed)
            name = ROW_NAMES[kind]
            seconds[name].append(time.perf_counter() - t)
            rows[name].append(accuracy(net, d.evaluation, sched))
            logs[f"{name} seed {seed}"] = log
            say(f"seed {seed} {name} {100 * rows[name][-1]:.1f} % ({seconds[name][-1]:.0f} s)")
    return rows, {"seconds": seconds, "curves": logs}


# name -> Schedule overrides; each run on the validation split
TUNE_VARIANTS: dict[str, dict] = {
    "default": {},
    "lambda 0.3": {"discrepancy_weight": 0.3},
    "lambda 3": {"discrepancy_weight": 3.0},
    "lambda 10": {"discrepancy_weight": 10.0},
    "n 1": {"generator_updates": 1},
    "n 4": {"generator_updates": 4},
    "mcd lr 5e-4": {"mcd_lr": 5e-4},
    "mcd lr 1e-3": {"mcd_lr": 1e-3},
    "n 2": {"generator_updates": 2},
    "mcd iters x1.5": {"mcd_iters": 1.5},  # multipliers of the base, see run_tuning
    "mcd iters x2": {"mcd_iters": 2},
    "head 1 only supervised": {"supervise": "f1"},
    # issue 25 item 5: L1 and SWD are ~30x and ~800x smaller than p-EMD (16+) at lambda 1
    "lambda 0": {"discrepancy_weight": 0.0},  # MCD steps without the discrepancy: control
    "lambda 30": {"discrepancy_weight": 30.0},
    "lambda 100": {"discrepancy_weight": 100.0},
    "matched lambda": {"kind_weights": (("l1", 30.0), ("swd", 800.0))},
    "matched lambda x0.3": {"kind_weights": (("l1", 10.0), ("swd", 250.0))},
    "matched lambda x3": {"kind_weights": (("l1", 100.0), ("swd", 2500.0))},
    "swd 1024 projections": {"swd_projections": 1024},
}


def run_tuning(
    proto: Protocol,
    sched: Schedule,
    seeds,
    n_target: int,
    variants,
    kinds,
    say=print,
    curve_every: int = 0,
    split: str = "val",
) -> list[dict]:
    """Every variant from the same source model per seed (one per ``supervise``
    setting), scored on the validation pairs (T1 vs T2-like, slices [80, 96));
    ``curve_every > 0`` also records the validation accuracy along each MCD run."""
    d = make_data(proto, n_target, split=split)
    results = []
    bases: dict[tuple, PatchNet] = {}
    for name in variants:
        over = dict(TUNE_VARIANTS[name])
        if "mcd_iters" in over:
            over["mcd_iters"] = int(over["mcd_iters"] * sched.mcd_iters)
        s = replace(sched, **over)
        record = {"variant": name, "overrides": over, "val": {}}
        for seed in seeds:
            key = (seed, s.supervise, s.source_iters, s.source_lr)
            if key not in bases:
                bases[key] = train_source(d.train, proto, s, seed)
            base = bases[key]
            record["val"].setdefault("source-only", []).append(accuracy(base, d.evaluation, s))
            for kind in kinds:
                net, log = mcd(
                    base,
                    kind,
                    d.train,
                    d.target,
                    proto,
                    s,
                    seed,
                    probe=lambda n, s=s: accuracy(n, d.evaluation, s),
                    probe_every=curve_every,
                )
                record["val"].setdefault(ROW_NAMES[kind], []).append(accuracy(net, d.evaluation, s))
                acc = record["val"][ROW_NAMES[kind]][-1]
                say(f"  {name} seed {seed} {ROW_NAMES[kind]} {100 * acc:.1f} %")
                curve = [(e["iteration"], e["probe"]) for e in log if "probe" in e]
                if curve:
                    record.setdefault("curves", {})[f"{ROW_NAMES[kind]} seed {seed}"] = curve
        say(
            f"tune {name}: "
            + ", ".join(f"{k} {100 * np.mean(v):.1f} %" for k, v in record["val"].items())
        )
        record["seeds"] = list(seeds)
        results.append(record)
    return results


# --------------------------------------------------------------------------- output


def _fmt(values) -> str:
    v = 100 * np.asarray(values, float)
    return f"{v.mean():.1f}" if v.size == 1 else f"{v.mean():.1f} ± {v.std():.1f}"


def markdown(blob: dict) -> str:
    m, proto, sched = blob["meta"], blob["protocol"], blob["schedule"]
    rows = blob["rows"]
    offs = ", ".join(str(int(o)) for o in class_offsets(proto["step"]))
    lines = [
        "## Paper protocol: patch-pair classification (Heinrich & Hansen, MIDL 2020)",
        "",
        f"Written by `{m['command']}` in {m['wall_seconds'] / 60:.1f} min on {m['machine']}; "
        f"seeds {', '.join(str(s) for s in m['seeds'])}.",
        "",
        "The paper's own protocol (talk slides), on this repository's synthetic data: every "
        "sample is a (fixed, moving) patch pair and the network classifies the moving "
        f"patch's displacement into 5 x 5 = 25 classes, {{{offs}}} px per axis (s = "
        f"{proto['step']} px; the paper: ±19, ±38 px). Patches are {proto['patch']} x "
        f"{proto['patch']} px cut from {proto['size']} x {proto['size']} px axial template "
        "slices rendered by `synthesize_contrast` (own bias field and noise per rendering, "
        f"{proto['renders']} renderings per slice and contrast, each warped by a smooth "
        f"random field of at most {proto['warp']} px); patch centres are brain pixels; the "
        f"moving patch is cut at centre + class offset + an integer jitter uniform in "
        f"[-{proto['jitter']}, {proto['jitter']}] px per axis from another rendering. Source: T1 "
        "vs T1 pairs with labels (no contrast augmentation). Target: T1 fixed vs "
        f"{proto['target_contrast'].upper()}-like moving; {m['n_target']} unlabelled target "
        f"pairs for adaptation and the source pairs from slices {tuple(proto['train_slices'])}, "
        f"{proto['n_test']} test pairs from the test slices {tuple(proto['test_slices'])} (seed "
        f"{proto['test_seed']}); validation pairs for `--tune` from slices "
        f"{tuple(proto['val_slices'])}.",
        "",
        f"Network: G = 4 blocks of conv + instance norm + PReLU ({m['weights_G']} weights, "
        f"16 x 18 x 18 features per patch); fixed and moving features concatenated; heads F1, F2 "
        f"= 3 blocks ({m['weights_F']} weights each) -> 25 logits, scaled by "
        f"{sched['logit_scale']} before the softmax. Supervised: "
        + ("head 1 only (the paper's variant)" if sched["supervise"] == "f1" else "both heads")
        + "; accuracy = argmax of "
        + ("head 1" if sched["supervise"] == "f1" else "the mean of both heads' probabilities")
        + f" == true class. Source training: {sched['source_iters']} Adam iterations, batch "
        f"{sched['batch']}, one-cycle lr {sched['source_lr']}. MCD (Saito et al. 2018) from the "
        f"same source weights per seed: {sched['mcd_iters']} iterations of step A (G, F1, F2 on "
        f"the source CE), B (G frozen: source CE - lambda d on the target), C (heads frozen: G "
        f"minimises lambda d, n = {sched['generator_updates']} updates); lambda = "
        f"{_lambda_text(sched)}, Adam lr {sched['mcd_lr']}, batches of {sched['batch']} "
        "source and target pairs; d from `napari_discreg.core.learning.discrepancy` on the (N, 5, 5) "
        "histograms; SWD and p-EMD (16+) draw fresh directions each iteration, the same in "
        "steps B and C. Model selection: none; the weights after the last iteration are "
        "evaluated (no test label is used for any choice).",
        "",
        "| row | label accuracy (mean ± std, %) | per seed (%) | paper (%) |",
        "|---|---|---|---|",
    ]
    for name in ROWS:
        vals = rows[name]
        per_seed = ", ".join(f"{100 * v:.1f}" for v in vals)
        paper = PAPER.get(name)
        lines.append(
            f"| {name} | {_fmt(vals)} | {per_seed} | {'-' if paper is None else f'{paper:.1f}'} |"
        )
    mean = {n: 100 * float(np.mean(rows[n])) for n in ROWS}
    chain = ("source-only", "MCD-SWD", "MCD-p-EMD (16+)")
    pairs = [(a, b) for i, a in enumerate(chain) for b in chain[i + 1 :]]
    order = all(mean[a] < mean[b] for a, b in pairs)
    gap = mean["MCD-p-EMD (16+)"] - PAPER["MCD-p-EMD (16+)"]
    lines += [
        "",
        "Paper's ordering source-only < MCD-SWD < MCD-p-EMD (16+) on the means: "
        + ("reached" if order else "not reached")
        + " ("
        + "; ".join(
            f"{a} < {b}: {'yes' if mean[a] < mean[b] else 'no'} ({mean[a]:.1f} vs {mean[b]:.1f})"
            for a, b in pairs
        )
        + f"). MCD-p-EMD (16+) vs the paper's {PAPER['MCD-p-EMD (16+)']} %: {gap:+.1f} points"
        + (" (reached)." if gap >= 0 else " (missed).")
        + " Seconds per run (mean over seeds): "
        + ", ".join(f"{n} {np.mean(v):.0f} s" for n, v in blob["seconds"].items())
        + ".",
    ]
    rounds = blob.get("tuning") or []
    rounds = [rounds] if isinstance(rounds, dict) else rounds
    # rounds scored on the test split (--tune --split test) are reported in the notes
    rounds = [r for r in rounds if r.get("split", "val") == "val"]
    if rounds:
        p = rounds[0]["protocol"]
        lines += [
            "",
            f"Settings tried on the validation split ({p['n_val']} T1 vs "
            f"{p['target_contrast'].upper()}-like pairs from slices {tuple(p['val_slices'])}, "
            "never the test pairs); label accuracy in %, mean ± std over the round's seeds; "
            "each variant changes the round's base schedule as listed, all variants of a round "
            "start from the same source model per seed and supervision. The schedule above is "
            "the one chosen from them.",
        ]
    keys = ("source_iters", "mcd_iters", "mcd_lr", "discrepancy_weight", "generator_updates")
    for number, tuning in enumerate(rounds, 1):
        t = tuning["results"]
        cols = list(t[0]["val"])
        base = tuning["schedule"]
        lines += [
            "",
            f"Round {number}: `{tuning['command']}`, seeds "
            f"{', '.join(str(s) for s in t[0]['seeds'])}, base: "
            + ", ".join(f"{k} {base[k]}" for k in (*keys, "supervise"))
            + f" ({tuning['wall_seconds'] / 60:.0f} min).",
            "",
            "| variant | overrides | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 2) + "|",
        ]
        for r in t:
            over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
            cells = " | ".join(_fmt(r["val"][c]) if c in r["val"] else "-" for c in cols)
            lines.append(f"| {r['variant']} | {over} | {cells} |")
    if rounds:
        n_mcd = len(m["seeds"]) * len(KINDS)
        per_iter = np.mean([np.mean(blob["seconds"][ROW_NAMES[k]]) for k in KINDS]) / max(
            sched["mcd_iters"], 1
        )
        fixed_s = m["wall_seconds"] - n_mcd * per_iter * sched["mcd_iters"]
        results = [r for t in rounds for r in t["results"]]
        longest = max(r["overrides"].get("mcd_iters", sched["mcd_iters"]) for r in results)
        est = fixed_s + n_mcd * per_iter * longest

        def val(r, col):
            return 100 * float(np.mean(r["val"][col])) if col in r["val"] else float("nan")

        text = (
            f"Chosen: supervise {sched['supervise']}, lambda {sched['discrepancy_weight']}, MCD "
            f"lr {sched['mcd_lr']}, n = {sched['generator_updates']}, {sched['mcd_iters']} MCD "
            "iterations, by MCD-p-EMD (16+) on validation among the runs that keep the full "
            "table near 25 minutes on one thread"
        )
        if longest > sched["mcd_iters"]:
            text += (
                f" ({longest} iterations would take about {est / 60:.0f} min at this run's "
                f"{per_iter:.2f} s per MCD iteration)"
            )
        f1 = [r for r in results if r["overrides"].get("supervise") == "f1"]
        if f1:
            text += (
                "; head 1 alone supervised (the paper's variant): source-only "
                f"{val(f1[0], 'source-only'):.1f} %, MCD-SWD {val(f1[0], 'MCD-SWD'):.1f} %, "
                f"MCD-p-EMD (16+) {val(f1[0], 'MCD-p-EMD (16+)'):.1f} % on validation"
            )
        last = rounds[-1]["results"]
        swd_up = sum(val(r, "MCD-SWD") > val(r, "source-only") for r in last)
        text += (
            f". In the last round, MCD-SWD beat source-only on validation in {swd_up} of "
            f"{len(last)} variants."
        )
        lines += ["", text]
    return "\n".join(lines)


NOTES = ("<!-- paper-protocol-notes:start -->", "<!-- paper-protocol-notes:end -->")


def kept_notes(path: Path) -> str:
    """The hand-written notes block inside the section (between the NOTES markers) of
    ``path``, kept when the script rewrites the section; "" if there is none."""
    text = path.read_text() if path.is_file() else ""
    if NOTES[0] not in text or NOTES[1] not in text:
        return ""
    return text[text.index(NOTES[0]) : text.index(NOTES[1]) + len(NOTES[1])]


def write_section(path: Path, text: str) -> None:
    notes = kept_notes(path)
    update_section(path, SECTION, text + ("\n\n" + notes if notes else ""))


def main(argv=None) -> int:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smoke run (< 60 s), tiny sizes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out-dir", type=Path, default=DOCS)
    ap.add_argument("--source-iters", type=int, default=None)
    ap.add_argument("--mcd-iters", type=int, default=None)
    ap.add_argument("--n-target", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument(
        "--tune", action="store_true", help="score TUNE_VARIANTS on the validation split"
    )
    ap.add_argument(
        "--variants", nargs="+", default=list(TUNE_VARIANTS), choices=list(TUNE_VARIANTS)
    )
    ap.add_argument("--tune-kinds", nargs="+", default=["swd", "pemd16+"], choices=list(KINDS))
    ap.add_argument(
        "--split",
        choices=["val", "test"],
        default="val",
        help="--tune: score the variants on this split ('test' only to confirm a setting "
        "chosen on 'val'; such rounds are left out of the tuning tables)",
    )
    ap.add_argument(
        "--curve-every",
        type=int,
        default=0,
        help="--tune: also log the validation accuracy every this many MCD iterations",
    )
    ap.add_argument(
        "--kind-weights",
        nargs="+",
        default=[],
        metavar="KIND=LAMBDA",
        help="a discrepancy's own lambda in the table (e.g. l1=30 swd=100); the others keep "
        "the schedule's discrepancy_weight",
    )
    ap.add_argument(
        "--markdown-only",
        action="store_true",
        help="rewrite the docs section from <out-dir>/paper_protocol.json, run nothing",
    )
    args = ap.parse_args(argv)
    proto, sched = Protocol(), Schedule()
    n_target = args.n_target
    if args.quick:
        proto = replace(
            proto,
            renders=1,
            train_slices=(40, 44),
            val_slices=(80, 82),
            test_slices=(100, 103),
            n_test=50,
            n_val=20,
        )
        sched = replace(sched, source_iters=4, mcd_iters=2, batch=8)
        n_target = 16
    if args.n_test is not None:
        proto = replace(proto, n_test=args.n_test)
    if args.source_iters is not None:
        sched = replace(sched, source_iters=args.source_iters)
    if args.mcd_iters is not None:
        sched = replace(sched, mcd_iters=args.mcd_iters)
    if args.kind_weights:
        sched = replace(sched, kind_weights=parse_kind_weights(args.kind_weights))
    args_given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(
        ["python benchmarks/paper_protocol.py", *(shlex.quote(a) for a in args_given)]
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "paper_protocol.json"
    old = json.loads(json_path.read_text()) if json_path.is_file() else {}
    t0 = time.perf_counter()
    if args.markdown_only:
        rows = {name: row["per_seed"] for name, row in old["rows"].items()}
        write_section(out / "benchmarks.md", markdown({**old, "rows": rows}))
        return 0
    if args.tune:
        results = run_tuning(
            proto,
            sched,
            args.seeds,
            n_target,
            args.variants,
            args.tune_kinds,
            curve_every=args.curve_every,
            split=args.split,
        )
        rounds = old.get("tuning", [])
        rounds = [rounds] if isinstance(rounds, dict) else list(rounds)
        rounds.append(
            {
                "command": command,
                "protocol": asdict(proto),
                "schedule": asdict(sched),
                "results": results,
                "split": args.split,
                "wall_seconds": time.perf_counter() - t0,
            }
        )
        old["tuning"] = rounds  # every --tune run adds a round
        json_path.write_text(json.dumps(old, indent=1))
        return 0
    rows, extra = run_table(proto, sched, args.seeds, n_target)
    net = PatchNet()
    blob = {
        "meta": {
            "command": command,
            "seeds": list(args.seeds),
            "wall_seconds": time.perf_counter() - t0,
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread, torch {torch.__version__}",
            "n_target": n_target,
            "weights_G": count_weights(net.G),
            "weights_F": count_weights(net.F1),
            "quick": bool(args.quick),
        },
        "protocol": asdict(proto),
        "schedule": asdict(sched),
        "paper": PAPER,
        "rows": {
            name: {
                "per_seed": vals,
                "mean": float(np.mean(vals)),
                "std": float(np.std(vals)),
                "paper": PAPER.get(name),
            }
            for name, vals in rows.items()
        },
        "seconds": extra["seconds"],
        "curves": extra["curves"],
    }
    if "tuning" in old:
        blob["tuning"] = old["tuning"]
    json_path.write_text(json.dumps(blob, indent=1))
    md_blob = {**blob, "rows": rows}
    write_section(out / "benchmarks.md", markdown(md_blob))
    print(f"wrote {json_path} and {out / 'benchmarks.md'} in {blob['meta']['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
