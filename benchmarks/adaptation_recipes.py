"""Adaptation recipes for the `mono` model (issue 25, item 1): a sweep script.

    python benchmarks/adaptation_recipes.py --list
    python benchmarks/adaptation_recipes.py --quick                       # smoke run
    python benchmarks/adaptation_recipes.py --variants "mcd default" "st 3x15" \
        --out /tmp/dev/adapt_sweep/results.json

Start: the shipped ``mono`` model. Target: T1 fixed vs T2-like / PD-like moving at
192 x 192, adapted on 8 unlabelled pairs from the training slices
(``core.benchmark.adaptation_pairs``), tested on the 40 held-out pairs of
``benchmarks/short_adaptation.py`` (``fixed_test_pairs(..., seed=123)``). The score is
the network's own EPE (``evaluate_model``, no refinement).

Variant kinds:

* ``mcd``: ``adapt_steps`` as shipped (the paper's MCD with a discrepancy), with
  ``AdaptConfig`` overrides.
* ``mcd_custom``: the same three MCD steps re-implemented here, so that only some
  parameters adapt (``params``: all / G / heads / last) and the rate can follow a schedule.
* ``selftrain``: cyclical self-training (Bigalke, Hansen & Heinrich, MICCAI 2023):
  per cycle, predict the 8 target fields with the current model, refine them by
  MIND-SSC instance optimisation (``core.registration.refine.refine_field``), turn the refined
  control-point displacements into (soft or hard) K x K labels and train the
  network on them with cross-entropy (optionally plus the source CE, the MCD
  discrepancy as an agreement term, or a MIND-SSC similarity of the soft-argmax field).
* ``mind``: no pseudo-labels: G (or all) minimises the MIND-SSC distance between
  fixed and moving warped by the network's expected (soft-argmax) field, plus a
  diffusion regulariser, optionally plus the heads' discrepancy and the source CE.

Adaptation seconds are wall-clock from the start of the recipe to the end (pseudo
labels, refinement and the selection criterion included), with 1 torch thread
(``torch.set_num_threads(1)``) on a possibly busy machine. The pseudo-label EPE
on the 8 target pairs is measured with their ground truth for diagnosis only; no
recipe reads it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _protocol import adaptation_pairs

from napari_discreg.core.config import AdaptConfig, DataConfig, RefineConfig, TrainConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files.checkpoint import load_model
from napari_discreg.core.learning.adapt import adapt_steps
from napari_discreg.core.learning.discrepancy import discrepancy_fn
from napari_discreg.core.learning.evaluate import evaluate_model, identity_metrics, summarise
from napari_discreg.core.learning.model import clone_model, correlation_volume, probabilities
from napari_discreg.core.learning.train import (
    control_point_weights,
    source_batches,
    source_cross_entropy,
)
from napari_discreg.core.registration.label_grid import expected_displacement, quantise, soft_labels
from napari_discreg.core.registration.mind import mind_ssc
from napari_discreg.core.registration.predict import (
    predict_field,
    prepare_target,
    selection_criterion,
)
from napari_discreg.core.registration.refine import refine_field
from napari_discreg.core.registration.warp import control_point_field, upsample_field, warp

DEFAULT_OUT = Path("/tmp/dev/adapt_sweep/results.json")

# name -> settings; "kind" picks the recipe, the rest are its options (see the run_* functions)
VARIANTS: dict[str, dict] = {
    # --- reference: the shipped default, the paper's MCD with pEMD
    "mcd default": {"kind": "mcd"},
    "mcd lr1e-3": {"kind": "mcd", "cfg": {"lr": 1e-3}},
    "mcd n4": {"kind": "mcd", "cfg": {"generator_updates": 4, "steps": 18}},
    "mcd swc0": {"kind": "mcd", "cfg": {"source_weight_c": 0.0}},
    "mcd b4 lr5e-4": {"kind": "mcd", "cfg": {"batch_size": 4, "steps": 20, "lr": 5e-4}},
    "mcdc G-only lr1e-3": {"kind": "mcd_custom", "params": "G", "lr": 1e-3, "steps": 36},
    "mcdc all lr1e-3 cos": {
        "kind": "mcd_custom",
        "params": "all",
        "lr": 1e-3,
        "steps": 36,
        "schedule": "cos",
    },
    # --- cyclical self-training on refined fields
    "st 3x15": {"kind": "selftrain", "cycles": 3, "steps": 15},
    "st 2x20": {"kind": "selftrain", "cycles": 2, "steps": 20},
    "st 1x40": {"kind": "selftrain", "cycles": 1, "steps": 40},
    "st 3x15 lr3e-3": {"kind": "selftrain", "cycles": 3, "steps": 15, "lr": 3e-3},
    "st 3x15 lr3e-4": {"kind": "selftrain", "cycles": 3, "steps": 15, "lr": 3e-4},
    "st 3x15 hard": {"kind": "selftrain", "cycles": 3, "steps": 15, "hard": True},
    "st 3x15 G": {"kind": "selftrain", "cycles": 3, "steps": 15, "params": "G"},
    "st 3x15 heads": {"kind": "selftrain", "cycles": 3, "steps": 15, "params": "heads"},
    "st 3x15 src0.25": {"kind": "selftrain", "cycles": 3, "steps": 15, "source_weight": 0.25},
    "st 3x15 b4": {"kind": "selftrain", "cycles": 3, "steps": 15, "batch": 4},
    "st 3x15 fast-refine": {"kind": "selftrain", "cycles": 3, "steps": 15, "refine": {"steps": 25}},
    "st 3x15 +mind": {"kind": "selftrain", "cycles": 3, "steps": 15, "mind_weight": 1.0},
    "st 3x15 +disc": {"kind": "selftrain", "cycles": 3, "steps": 15, "disc_weight": 1.0},
    # --- screens (heads-only self-training and its refinements)
    "st 1x45 lr3e-3": {"kind": "selftrain", "cycles": 1, "steps": 45, "lr": 0.003},
    "st 1x45 lr1e-2": {"kind": "selftrain", "cycles": 1, "steps": 45, "lr": 0.01},
    "st 1x45 lr3e-3 reg1": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 45,
        "lr": 0.003,
        "reg_weight": 1.0,
    },
    "st 1x45 lr3e-3 G": {"kind": "selftrain", "cycles": 1, "steps": 45, "lr": 0.003, "params": "G"},
    "st 1x45 lr3e-3 heads": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 45,
        "lr": 0.003,
        "params": "heads",
    },
    "st heads 1x90 lr3e-3": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 90,
        "lr": 0.003,
        "params": "heads",
        "eval_every": 15,
    },
    "st heads 1x90 lr1e-2": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 90,
        "lr": 0.01,
        "params": "heads",
        "eval_every": 15,
    },
    "st heads 1x45 b8 lr3e-3": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 45,
        "lr": 0.003,
        "params": "heads",
        "batch": 8,
        "eval_every": 15,
    },
    "st all 1x45 lr3e-3 g3e-4": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 45,
        "lr": 0.003,
        "g_lr": 0.0003,
        "eval_every": 15,
    },
    "st heads 1x200 lr3e-3": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.003,
        "params": "heads",
        "eval_every": 50,
    },
    "st heads 2x100 lr3e-3": {
        "kind": "selftrain",
        "cycles": 2,
        "steps": 100,
        "lr": 0.003,
        "params": "heads",
        "eval_every": 50,
    },
    "st heads 1x200 lr3e-3 cos": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.003,
        "params": "heads",
        "schedule": "cos",
        "eval_every": 50,
    },
    "st heads 1x200 lr3e-3 R": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.003,
        "params": "heads",
        "refine": {"levels": 3, "smoothness": 0.1},
        "eval_every": 50,
    },
    "st heads 1x200 lr5e-3 R": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.005,
        "params": "heads",
        "refine": {"levels": 3, "smoothness": 0.1},
        "eval_every": 50,
    },
    "st heads_late 1x200 lr3e-3 R": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.003,
        "params": "heads_late",
        "refine": {"levels": 3, "smoothness": 0.1},
        "eval_every": 50,
    },
    "st heads+g1x1 1x200 lr3e-3 R": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.003,
        "params": "heads+g1x1",
        "refine": {"levels": 3, "smoothness": 0.1},
        "eval_every": 50,
    },
    "st HL 1x200 R flip": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.003,
        "params": "heads_late",
        "refine": {"levels": 3, "smoothness": 0.1},
        "flip": True,
        "eval_every": 100,
    },
    "st HL 1x200 R ema": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.003,
        "params": "heads_late",
        "refine": {"levels": 3, "smoothness": 0.1},
        "ema": 0.95,
        "eval_every": 100,
    },
    "st HL 1x200 R flip ema": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.003,
        "params": "heads_late",
        "refine": {"levels": 3, "smoothness": 0.1},
        "flip": True,
        "ema": 0.95,
    },
    "st HL 1x300 R flip ema": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 300,
        "lr": 0.003,
        "params": "heads_late",
        "refine": {"levels": 3, "smoothness": 0.1},
        "flip": True,
        "ema": 0.95,
    },
    "st heads 1x200 R flip ema": {
        "kind": "selftrain",
        "cycles": 1,
        "steps": 200,
        "lr": 0.003,
        "params": "heads",
        "refine": {"levels": 3, "smoothness": 0.1},
        "flip": True,
        "ema": 0.95,
    },
    "st HL 2x100 R flip ema": {
        "kind": "selftrain",
        "cycles": 2,
        "steps": 100,
        "lr": 0.003,
        "params": "heads_late",
        "refine": {"levels": 3, "smoothness": 0.1},
        "flip": True,
        "ema": 0.95,
    },
    # --- unsupervised MIND-SSC loss on the expected field
    "mind G 36": {"kind": "mind", "steps": 36, "params": "G"},
    "mind all 36": {"kind": "mind", "steps": 36, "params": "all"},
    "mind all 36 +disc": {"kind": "mind", "steps": 36, "params": "all", "disc_weight": 1.0},
}


def _set_params(model, which: str) -> list[torch.nn.Parameter]:
    """Parameters that adapt; the others get requires_grad False."""
    if which == "all":
        chosen = list(model.parameters())
    elif which == "G":
        chosen = list(model.G.parameters())
    elif which == "heads":
        chosen = list(model.F1.parameters()) + list(model.F2.parameters())
    elif which == "heads_late":  # the heads without their first convolution
        first = {id(p) for h in (model.F1, model.F2) for p in h.net[0].parameters()}
        chosen = [p for h in (model.F1, model.F2) for p in h.parameters() if id(p) not in first]
    elif which in ("last", "heads+g1x1"):  # the last (1 x 1) conv of G and the heads
        g_last = list(model.G.body[-1].parameters())
        chosen = g_last + list(model.F1.parameters()) + list(model.F2.parameters())
    else:
        raise ValueError(f"unknown params {which!r}")
    ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return chosen


def _schedule(opt, total: int, kind: str):
    if kind == "cos":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1)))
        )
    if kind == "onecycle" and total >= 10:
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=opt.param_groups[0]["lr"], total_steps=total, pct_start=0.2
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _pseudo_label_ce(model, cost, target, weights):
    l1, l2 = model.heads(cost)
    norm = weights.sum()
    loss = 0.0
    for logits in (l1, l2):
        per_point = -(target * F.log_softmax(logits.flatten(-2), dim=-1)).sum(-1)
        loss = loss + (per_point * weights).sum() / norm
    return loss, (l1, l2)


def _mind_loss(model, logits, fixed, moving, mask, smooth: float):
    """MIND-SSC distance of fixed vs moving warped by the soft-argmax field (+ diffusion)."""
    l1, l2 = logits
    prob = 0.5 * (probabilities(l1) + probabilities(l2))
    cp = expected_displacement(prob, model.offsets)
    dense = upsample_field(cp, model.config.stride, tuple(fixed.shape[-2:]))
    warped = warp(moving, dense)
    diff = (mind_ssc(fixed) - mind_ssc(warped)).pow(2).mean(1, keepdim=True)
    sim = (diff * mask).sum() / mask.sum().clamp_min(1.0)
    reg = (cp[..., 1:, :] - cp[..., :-1, :]).pow(2).mean() + (cp[..., :, 1:] - cp[..., :, :-1]).pow(
        2
    ).mean()
    return sim + smooth * reg


def _discrepancy(model, logits, mask, dfun):
    l1, l2 = logits
    fg = F.max_pool2d(mask, model.config.stride)[:, 0] > 0
    return dfun(probabilities(l1)[fg], probabilities(l2)[fg])


def make_pseudo_labels(model, tf, tm, rcfg: RefineConfig, init: str, hard: bool):
    """(N, h, w, K^2) targets from the refined fields of the current model (and the fields)."""
    mc = model.config
    model.eval()
    with torch.no_grad():
        if init == "zero":
            start = None
        else:
            start, _, _ = predict_field(model, tf, tm)
    refined = refine_field(tf, tm, start, rcfg)
    cp = control_point_field(refined, mc.stride)
    if hard:
        lab = quantise(cp, mc.num_labels, mc.capture_range)
        target = F.one_hot(lab, mc.num_labels**2).float()
    else:
        target = soft_labels(cp, mc.num_labels, mc.capture_range).flatten(-2)
    model.train()
    return target, refined


def _pseudo_epe(refined: torch.Tensor, truth_pairs) -> float:
    """Diagnostic only: EPE of the refined target fields against their ground truth."""
    errs = []
    for i, pair in enumerate(truth_pairs):
        h, w = pair.fixed.shape
        d = refined[i, :, :h, :w].numpy() - pair.displacement
        m = pair.mask > 0
        errs.append(float(np.sqrt((d**2).sum(0))[m].mean()))
    return float(np.mean(errs))


def run_selftrain(model, tf, tm, tmask, opts, seed, truth_pairs, log, probe=None) -> dict:
    mc = model.config
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cycles = opts.get("cycles", 3)
    steps = opts.get("steps", 15)
    batch = opts.get("batch", 2)
    lr = opts.get("lr", 1e-3)
    rcfg = RefineConfig(**opts.get("refine", {}))
    rcfg_later = RefineConfig(**opts.get("refine_later", opts.get("refine", {})))
    which = opts.get("params", "all")
    params = _set_params(model, which)
    g_lr = opts.get("g_lr")  # a separate rate for G (params "all")
    if g_lr is not None and which == "all":
        g_ids = {id(p) for p in model.G.parameters()}
        opt = torch.optim.Adam(
            [
                {"params": list(model.G.parameters()), "lr": g_lr},
                {"params": [p for p in params if id(p) not in g_ids], "lr": lr},
            ]
        )
    else:
        opt = torch.optim.Adam(params, lr=lr)
    sched = _schedule(opt, cycles * steps, opts.get("schedule", "const"))
    # heads only: G is fixed, so the target cost volumes are computed once
    cached_cost = None
    flip = opts.get("flip", False)
    if which in ("heads", "heads_late"):
        with torch.no_grad():
            views = [(tf, tm)] + ([(tf.flip(-1), tm.flip(-1))] if flip else [])
            cached_cost = torch.cat(
                [
                    model.cost_volume(a[i : i + 2], b[i : i + 2])
                    for a, b in views
                    for i in range(0, len(a), 2)
                ]
            )
    elif flip:
        raise ValueError("flip is implemented for params heads / heads_late only")
    n_views = 2 if flip else 1
    ema_decay = opts.get("ema", 0.0)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if ema_decay else None
    # heads and G's last 1 x 1 conv: G's features before it are computed once
    cached_pre = None
    if which == "heads+g1x1":
        with torch.no_grad():
            body = model.G.body[:-1]
            cached_pre = (
                torch.cat(
                    [body(F.avg_pool2d(model.G.full(x[i : i + 2]), 2)) for i in range(0, len(x), 2)]
                )
                for x in (tf, tm)
            )
            cached_pre = tuple(cached_pre)

    def cost_from_pre(idx):
        ff = model.G.body[-1](cached_pre[0][idx])
        mf = model.G.body[-1](cached_pre[1][idx])
        s_ = mc.stride
        hw = (tf.shape[-2] // s_, tf.shape[-1] // s_)
        return mc.temperature * correlation_volume(ff, mf, model.offsets, s_, hw)

    fresh_opt = opts.get("fresh_opt", False)
    ws = opts.get("source_weight", 0.0)
    wmind = opts.get("mind_weight", 0.0)
    wdisc = opts.get("disc_weight", 0.0)
    wreg = opts.get("reg_weight", 0.0)
    dfun = discrepancy_fn("pemd", diagonals=True)
    src = (
        source_batches(
            DataConfig(), batch, TrainConfig.source_contrasts, rng, tf.device, augment=True
        )
        if ws > 0
        else None
    )
    info = {"cycles": [], "train_steps": cycles * steps}
    select = opts.get("select", False)
    wcost = opts.get("cost_ce_weight", 0.0)
    eval_every = opts.get("eval_every", 0)
    info["curve"] = []
    done = 0
    best = None
    for c in range(cycles):
        t0 = time.perf_counter()
        target, refined = make_pseudo_labels(
            model,
            tf,
            tm,
            rcfg if c == 0 else rcfg_later,
            opts.get("init", "net"),
            opts.get("hard", False),
        )
        cp_target = control_point_field(refined, mc.stride)
        if flip:  # the mirrored pairs' fields: mirrored, column displacement negated
            cp_flip = cp_target.flip(-1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
            if opts.get("hard", False):
                lab = quantise(cp_flip, mc.num_labels, mc.capture_range)
                t_flip = F.one_hot(lab, mc.num_labels**2).float()
            else:
                t_flip = soft_labels(cp_flip, mc.num_labels, mc.capture_range).flatten(-2)
            target = torch.cat([target, t_flip])
            cp_target = torch.cat([cp_target, cp_flip])
        t_ref = time.perf_counter() - t0
        cyc = {"refine_seconds": t_ref, "pseudo_epe": _pseudo_epe(refined, truth_pairs)}
        if fresh_opt and c > 0:
            opt = torch.optim.Adam(params, lr=lr)
        model.train()
        for _ in range(steps):
            idx = torch.from_numpy(rng.choice(n_views * tf.shape[0], size=batch, replace=False))
            base_idx = idx % tf.shape[0]
            f, m, mk = tf[base_idx], tm[base_idx], tmask[base_idx]
            if flip:
                mk = torch.where((idx >= tf.shape[0]).view(-1, 1, 1, 1), mk.flip(-1), mk)
            if cached_cost is not None:
                cost = cached_cost[idx]
            elif cached_pre is not None:
                cost = cost_from_pre(idx)
            else:
                cost = model.cost_volume(f, m)
            wt_all = control_point_weights(mk, mc.stride)
            loss, logits = _pseudo_label_ce(model, cost, target[idx], wt_all)
            if wcost > 0:  # CE of the raw cost volume itself: trains G directly
                wt = wt_all
                logp = F.log_softmax(cost.permute(0, 2, 3, 1), dim=-1)
                loss = loss + wcost * (-(target[idx] * logp).sum(-1) * wt).sum() / wt.sum()
            if wmind > 0:
                loss = loss + wmind * _mind_loss(model, logits, f, m, mk, 0.1)
            if wreg > 0:  # the expected (soft-argmax) displacement vs the refined one
                prob = 0.5 * (probabilities(logits[0]) + probabilities(logits[1]))
                cp_pred = expected_displacement(prob, model.offsets)
                err = (cp_pred - cp_target[idx]).pow(2).sum(1).add(0.01).sqrt()
                wt = wt_all
                loss = loss + wreg * (err * wt).sum() / wt.sum()
            if wdisc > 0:
                loss = loss + wdisc * _discrepancy(model, logits, mk, dfun)
            if src is not None:
                ce, _ = source_cross_entropy(model, next(src))
                loss = loss + ws * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.dtype.is_floating_point:
                            ema[k].mul_(ema_decay).add_(v.detach(), alpha=1 - ema_decay)
            done += 1
            if probe is not None and eval_every and done % eval_every == 0:
                info["curve"].append({"step": done, "epe": probe(model)})
                log(f"    step {done}: test EPE {info['curve'][-1]['epe']:.3f}")
                model.train()
        cyc["loss_last"] = float(loss.detach())
        if select:
            score = selection_criterion(model, tf, tm, tmask, "mind")
            cyc["criterion"] = score
            if best is None or score > best[0]:
                best = (score, {k: v.detach().clone() for k, v in model.state_dict().items()})
        info["cycles"].append(cyc)
        log(
            f"  cycle {c + 1}: refine {t_ref:.1f} s, pseudo EPE {cyc['pseudo_epe']:.3f}, "
            f"loss {cyc['loss_last']:.3f}"
        )
    if ema is not None:  # the running average of the weights
        model.load_state_dict(ema)
    if select and best is not None:
        model.load_state_dict(best[1])
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return info


def run_mind(model, tf, tm, tmask, opts, seed, truth_pairs, log) -> dict:
    rng = np.random.default_rng(seed)
    steps = opts.get("steps", 36)
    batch = opts.get("batch", 2)
    params = _set_params(model, opts.get("params", "G"))
    opt = torch.optim.Adam(params, lr=opts.get("lr", 1e-3))
    sched = _schedule(opt, steps, opts.get("schedule", "const"))
    wdisc = opts.get("disc_weight", 0.0)
    ws = opts.get("source_weight", 0.0)
    smooth = opts.get("smooth", 0.1)
    dfun = discrepancy_fn("pemd", diagonals=True)
    src = (
        source_batches(
            DataConfig(), batch, TrainConfig.source_contrasts, rng, tf.device, augment=True
        )
        if ws > 0
        else None
    )
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(tf.shape[0], size=batch, replace=False))
        f, m, mk = tf[idx], tm[idx], tmask[idx]
        logits = model.heads(model.cost_volume(f, m))
        loss = _mind_loss(model, logits, f, m, mk, smooth)
        if wdisc > 0:
            loss = loss + wdisc * _discrepancy(model, logits, mk, dfun)
        if src is not None:
            ce, _ = source_cross_entropy(model, next(src))
            loss = loss + ws * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"train_steps": steps, "loss_last": float(loss.detach())}


def run_mcd(model, tf, tm, tmask, opts, seed, truth_pairs, log, fixed=None, moving=None):
    # the paper's MCD short default, pinned field by field: AdaptConfig()'s own defaults
    # may change (src is being edited), and a reference row must not follow them
    pinned = {
        "method": "mcd",
        "steps": 36,
        "batch_size": 2,
        "lr": 2e-4,
        "discrepancy_weight": 1.0,
        "generator_updates": 1,
        "source_weight_c": 0.25,
        "select_every": 6,
        "keep_best": True,
        "criterion": "mind",
        "source_augmentation": True,
        "holdout": 0.0,
    }
    fields = AdaptConfig().to_dict()
    pinned = {k: v for k, v in pinned.items() if k in fields}
    cfg = replace(AdaptConfig(), seed=seed, **{**pinned, **opts.get("cfg", {})})
    n = 0
    for _rec in adapt_steps(
        model, fixed, moving, discrepancy=opts.get("discrepancy", "pemd"), config=cfg, device="cpu"
    ):
        n += 1
    return {
        "train_steps": cfg.steps,
        "adapt_config": cfg.to_dict(),
        "kept_iteration": _rec.best_iteration,
    }


def run_mcd_custom(model, tf, tm, tmask, opts, seed, truth_pairs, log) -> dict:
    """MCD steps A, B, C as adapt_steps, but with a parameter subset for step C / A and a
    schedule; no keep-best."""
    mc = model.config
    rng = np.random.default_rng(seed)
    steps = opts.get("steps", 36)
    batch = opts.get("batch", 2)
    lr = opts.get("lr", 2e-4)
    which = opts.get("params", "all")
    g_params = list(model.G.parameters())
    if which == "G":
        h_params: list = []
    else:
        h_params = list(model.F1.parameters()) + list(model.F2.parameters())
    opt_g = torch.optim.Adam(g_params, lr=lr)
    opt_f = torch.optim.Adam(h_params, lr=lr) if h_params else None
    sg = _schedule(opt_g, steps, opts.get("schedule", "const"))
    sf = _schedule(opt_f, steps, opts.get("schedule", "const")) if opt_f else None
    dfun = discrepancy_fn("pemd", diagonals=True)
    src_it = source_batches(
        DataConfig(), batch, TrainConfig.source_contrasts, rng, tf.device, augment=True
    )
    wc = opts.get("source_weight_c", 0.25)
    model.train()
    for _ in range(steps):
        src = next(src_it)
        idx = torch.from_numpy(rng.integers(0, tf.shape[0], size=batch))
        f, m, mk = tf[idx], tm[idx], tmask[idx]
        if opt_f is not None:
            loss_a, _ = source_cross_entropy(model, src)
            opt_g.zero_grad(set_to_none=True)
            opt_f.zero_grad(set_to_none=True)
            loss_a.backward()
            opt_g.step()
            opt_f.step()
            with torch.no_grad():
                cs = model.cost_volume(src["fixed"], src["moving"])
                ct = model.cost_volume(f, m)
            ce_b, _ = source_cross_entropy(model, src, cost=cs)
            loss_b = ce_b - _discrepancy(model, model.heads(ct), mk, dfun)
            opt_f.zero_grad(set_to_none=True)
            loss_b.backward()
            opt_f.step()
        for p in h_params or list(model.F1.parameters()) + list(model.F2.parameters()):
            p.requires_grad_(False)
        loss_c = _discrepancy(model, model.heads(model.cost_volume(f, m)), mk, dfun)
        if wc > 0:
            ce_c, _ = source_cross_entropy(model, src)
            loss_c = loss_c + wc * ce_c
        opt_g.zero_grad(set_to_none=True)
        loss_c.backward()
        opt_g.step()
        for p in model.parameters():
            p.requires_grad_(True)
        sg.step()
        if sf is not None:
            sf.step()
    del mc
    model.eval()
    return {"train_steps": steps}


RUNNERS = {
    "selftrain": run_selftrain,
    "mind": run_mind,
    "mcd_custom": run_mcd_custom,
}


def _target_truth(template, dcfg, n, contrast, seed=999):
    """The same pairs as adaptation_pairs, with their ground truth (diagnostics only)."""
    lo, hi = dcfg.train_slices
    indices = np.linspace(lo, hi - 1, n).round().astype(int)
    return [
        data.make_pair(template, int(i), "t1", contrast, np.random.default_rng([seed, k]), dcfg)
        for k, i in enumerate(indices)
    ]


def tune_refine(args, grid: list[dict]) -> int:
    """Refinement settings for pseudo-labels, judged on other training-slice pairs."""
    dcfg = DataConfig(size=args.size)
    template = data.load_template(args.size)
    rows = []
    for contrast in args.contrasts:
        pairs = _target_truth(template, dcfg, args.n_adapt, contrast, seed=555)
        tf, tm, _ = prepare_target(
            np.stack([p.fixed for p in pairs]),
            np.stack([p.moving for p in pairs]),
            4,
            torch.device("cpu"),
        )
        for over in grid:
            t0 = time.perf_counter()
            refined = refine_field(tf, tm, None, RefineConfig(**over))
            sec = time.perf_counter() - t0
            e = _pseudo_epe(refined, pairs)
            rows.append({"contrast": contrast, "refine": over, "epe": e, "seconds": sec})
            print(f"{contrast} {json.dumps(over)}: EPE {e:.3f} ({sec:.1f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 test pairs, 2 steps")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--variants", nargs="+", default=["mcd default", "st 3x15"])
    ap.add_argument(
        "--extra", type=str, default=None, help='JSON {"name": {settings}} of extra variants to run'
    )
    ap.add_argument("--contrasts", nargs="+", default=["t2", "pd"])
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--n-adapt", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="mono")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--tune-refine",
        type=str,
        default=None,
        help="JSON list of RefineConfig overrides: pseudo-label EPE of refinement "
        "from zero on 8 other training-slice pairs (seed 555), then exit",
    )
    args = ap.parse_args(argv)
    variants = dict(VARIANTS)
    if args.extra:
        variants.update(json.loads(args.extra))
    if args.list:
        for name, opts in variants.items():
            print(f"{name!r}: {json.dumps(opts)}")
        return 0
    torch.set_num_threads(args.threads)
    if args.tune_refine:
        return tune_refine(args, json.loads(args.tune_refine))
    n_test = 4 if args.quick else args.n_test
    dcfg = DataConfig(size=args.size)
    template = data.load_template(args.size)
    base = load_model(args.model, device="cpu")
    mc = base.config
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    for contrast in args.contrasts:
        test_pairs = data.fixed_test_pairs(
            template, dcfg, n=n_test, fixed_contrast="t1", moving_contrast=contrast, seed=123
        )
        fixed, moving = adaptation_pairs(template, dcfg, n=args.n_adapt, moving_contrast=contrast)
        truth = _target_truth(template, dcfg, args.n_adapt, contrast)
        assert all(np.array_equal(p.fixed, f) for p, f in zip(truth, fixed, strict=True))
        ident = summarise(identity_metrics(test_pairs, mc.stride, mc.num_labels, mc.capture_range))
        start = summarise(evaluate_model(base, test_pairs))
        log(f"{contrast}: identity EPE {ident['epe']:.3f}, start EPE {start['epe']:.3f}")
        for name in args.variants:
            opts = dict(variants[name])
            if args.quick:
                for key in ("steps",):
                    if key in opts:
                        opts[key] = 2
                if opts["kind"] == "mcd":
                    opts["cfg"] = {**opts.get("cfg", {}), "steps": 2, "select_every": 1}
                if opts["kind"] == "selftrain":
                    opts["cycles"] = min(opts.get("cycles", 3), 2)
                    opts["refine"] = {"steps": 2}
            probe_seconds = [0.0]

            def probe(m, _pairs=test_pairs, _acc=probe_seconds):
                t = time.perf_counter()
                value = summarise(evaluate_model(m, _pairs))["epe"]
                _acc[0] += time.perf_counter() - t
                return value

            model = clone_model(base)
            tf, tm, tmask = prepare_target(fixed, moving, mc.stride, torch.device("cpu"))
            t0 = time.perf_counter()
            status = "ok"
            try:
                if opts["kind"] == "mcd":
                    info = run_mcd(
                        model,
                        tf,
                        tm,
                        tmask,
                        opts,
                        args.seed,
                        truth,
                        log,
                        fixed=fixed,
                        moving=moving,
                    )
                elif opts["kind"] == "selftrain":
                    info = run_selftrain(
                        model, tf, tm, tmask, opts, args.seed, truth, log, probe=probe
                    )
                else:
                    info = RUNNERS[opts["kind"]](model, tf, tm, tmask, opts, args.seed, truth, log)
            except Exception as exc:  # report the failure, keep sweeping
                status = f"failed: {type(exc).__name__}: {exc}"
                info = {}
            seconds = time.perf_counter() - t0 - probe_seconds[0]  # probes untimed
            after = summarise(evaluate_model(model, test_pairs)) if status == "ok" else {}
            row = {
                "variant": name,
                "contrast": contrast,
                "settings": opts,
                "status": status,
                "seconds": seconds,
                "threads": torch.get_num_threads(),
                "load_1min": os.getloadavg()[0],
                "identity_epe": ident["epe"],
                "start_epe": start["epe"],
                "epe": after.get("epe"),
                "label_accuracy": after.get("label_accuracy"),
                "info": info,
                "quick": args.quick,
                "seed": args.seed,
            }
            results[f"{name} | {contrast} | seed {args.seed}{' | quick' if args.quick else ''}"] = (
                row
            )
            args.out.write_text(json.dumps(results, indent=1, default=float))
            epe = after.get("epe", float("nan"))
            log(
                f"{contrast} | {name} | {status} | {seconds:.1f} s | EPE {epe:.3f} "
                f"(start {start['epe']:.3f}, identity {ident['epe']:.3f}, "
                f"ratio start {epe / start['epe']:.2f}, identity {epe / ident['epe']:.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
