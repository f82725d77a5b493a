"""Self-training on the pipeline's own refined fields: adaptation without labels that pays off.

After Bigalke, Hansen and Heinrich's cyclical self-training (MICCAI 2023): the model
predicts a field for each unlabelled target pair, instance optimisation refines it under
MIND-SSC (:func:`~napari_discreg.core.registration.refine.refine_field`, a contrast-invariant
similarity the network does not see), and the refined field, read at the control points
as soft labels over the K x K displacement classes, is what the heads learn. The feature
extractor G and the first layer of each head stay fixed, so the target cost volumes are
computed once and each step costs two small head passes; the mirrored pairs (both images
flipped left to right, the column displacement negated) double the pairs.

``benchmarks/adaptation_recipes.py`` measured this against MCD and its variants on the
template's held-out T1 vs T2-like and PD-like pairs (docs/benchmarks.md, "Adaptation that
pays off").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AdaptConfig, RefineConfig
from ..registration.label_grid import soft_labels
from ..registration.predict import foreground_mind_distance, predict_field
from ..registration.refine import refine_field
from ..registration.warp import control_point_field, warp
from .model import DiscreteRegistrationNet
from .train import control_point_weights


def trainable_parameters(model: DiscreteRegistrationNet) -> list[torch.nn.Parameter]:
    """The parameters self-training adapts: both heads without their first layer (their
    1 x 1 bottleneck, or the 3 x 3 convolution of heads without one)."""
    chosen = []
    for head in (model.F1, model.F2):
        first = {id(p) for p in head.net[0].parameters()}
        chosen += [p for p in head.parameters() if id(p) not in first]
    return chosen


def pseudo_refine_config(config: AdaptConfig) -> RefineConfig:
    """The instance optimisation that turns the model's field into pseudo-labels."""
    return RefineConfig(levels=config.pseudo_levels, smoothness=config.pseudo_smoothness)


@torch.no_grad()
def pseudo_labels(
    model: DiscreteRegistrationNet,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    config: AdaptConfig,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Soft labels ``(N, h, w, K * K)`` from the refined fields of padded pairs, and the
    refinement's gain: ``1 - d(refined) / d(model)`` with ``d`` the MIND-SSC distance of
    fixed and warped moving over the foreground (``mask``), averaged over the pairs. A
    small gain says the model's fields already match the images about as well as
    instance optimisation can make them: there is little to learn, and the refined
    fields may be further from the truth than the model. Measured: the shipped
    ``default`` model 0.04-0.07 on 192 px T2/PD-like pairs and on the real stain pairs'
    tiles, 0.16 on 64 px pairs; the ``mono`` model 0.41-0.60 at 192 px, where
    self-training takes it from 4.06 to 0.78 px (``AdaptConfig.min_pseudo_gain`` 0.25
    lies between)."""
    mc = model.config
    was_training = model.training
    model.eval()
    targets, before, after = [], [], []
    for i in range(fixed.shape[0]):
        f, m = fixed[i : i + 1], moving[i : i + 1]
        k = torch.ones_like(f) if mask is None else mask[i : i + 1]
        start, _, _ = predict_field(model, f, m)
        with torch.enable_grad():
            refined = refine_field(f, m, start, pseudo_refine_config(config)).detach()
        before.append(foreground_mind_distance(f, warp(m, start), k))
        after.append(foreground_mind_distance(f, warp(m, refined), k))
        cp = control_point_field(refined, mc.stride)
        targets.append(soft_labels(cp, mc.num_labels, mc.capture_range).flatten(-2))
    model.train(was_training)
    gain = 1.0 - float(np.mean(after)) / max(float(np.mean(before)), 1e-12)
    return torch.cat(targets), gain


def mirrored_labels(targets: torch.Tensor, num_labels: int) -> torch.Tensor:
    """The soft labels of the left-right mirrored pairs: control points mirrored, and the
    column displacement negated (the label grid's column axis reversed)."""
    k = num_labels
    grid = targets.reshape(*targets.shape[:-1], k, k)
    return grid.flip(2).flip(-1).reshape(targets.shape)


class SelfTraining:
    """One run's self-training: the pseudo-labels and cost volumes of its target pairs,
    made once (``targets``: the pseudo-labels of a run being resumed), and one Adam step
    on the heads per :meth:`step`."""

    def __init__(
        self,
        model: DiscreteRegistrationNet,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        mask: torch.Tensor,
        config: AdaptConfig,
        rng: np.random.Generator,
        targets: torch.Tensor | None = None,
    ) -> None:
        self.model, self.config, self.rng = model, config, rng
        mc = model.config
        #: the refinement's MIND-SSC gain over the model's fields (None when resumed)
        self.gain: float | None = None
        if targets is None:
            targets, self.gain = pseudo_labels(model, fixed, moving, config, mask)
        #: the pseudo-labels of the pairs (not mirrored): what a resumed run needs
        self.pair_targets = targets
        weights = control_point_weights(mask, mc.stride)
        costs = self._costs(fixed, moving)
        if config.flip:
            targets = torch.cat([targets, mirrored_labels(targets, mc.num_labels)])
            costs = torch.cat([costs, self._costs(fixed.flip(-1), moving.flip(-1))])
            weights = torch.cat([weights, weights.flip(-1)])
        self.targets, self.costs, self.weights = targets, costs, weights
        self.parameters = trainable_parameters(model)

    @torch.no_grad()
    def _costs(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The (fixed) feature extractor's cost volumes of the pairs, two at a time."""
        step = 2
        return torch.cat(
            [
                self.model.cost_volume(fixed[i : i + step], moving[i : i + step])
                for i in range(0, len(fixed), step)
            ]
        )

    def optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"heads": torch.optim.Adam(self.parameters, lr=lr)}

    def freeze(self, frozen: bool) -> None:
        """Only :func:`trainable_parameters` take gradients while ``frozen`` is True."""
        ids = {id(p) for p in self.parameters}
        for p in self.model.parameters():
            p.requires_grad_(not frozen or id(p) in ids)

    def step(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One Adam step on a batch of pairs: soft cross-entropy of both heads."""
        n = self.costs.shape[0]
        size = min(self.config.batch_size, n)
        idx = torch.from_numpy(self.rng.choice(n, size=size, replace=False))
        logits = self.model.heads(self.costs[idx])
        target, weight = self.targets[idx], self.weights[idx]
        loss = logits[0].new_zeros(())
        for head in logits:
            per_point = -(target * F.log_softmax(head.flatten(-2), dim=-1)).sum(-1)
            loss = loss + (per_point * weight).sum() / weight.sum().clamp_min(1e-6)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"pseudo_label_ce": float(loss.detach())}


def tile_starts(n: int, size: int, overlap: float) -> list[int]:
    """Where ``size`` px tiles overlapping by ``overlap`` start along a side of ``n`` px:
    every step from 0, and the last tile flush with the end (one tile at 0 when the side
    is no longer than a tile)."""
    if n <= size:
        return [0]
    step = max(1, round(size * (1.0 - overlap)))
    last = n - size
    return sorted({*range(0, last, step), last})


def registered_pair_tiles(
    fixed, moving, matrix, *, size: int = 192, overlap: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Target pairs for adapting the network stage on one real pair: the fixed image and
    the moving image resampled by the pre-alignment ``matrix`` (fixed pixel -> moving
    pixel, :attr:`~napari_discreg.core.registration.register.RegistrationResult.affine`), both as
    dark-background gray images, cut into ``size`` x ``size`` tiles overlapping by
    ``overlap`` (an image smaller than a tile is one tile, padded). Returns two stacks
    ``(N, size, size)``: what the network sees after the pre-alignment."""
    from ..registration.prealign import resample, tissue_image, to_gray

    f = tissue_image(to_gray(fixed))
    m = resample(tissue_image(to_gray(moving)), matrix, f.shape)
    h, w = f.shape
    tiles_f, tiles_m = [], []
    for r in tile_starts(h, size, overlap):
        for c in tile_starts(w, size, overlap):
            tf = np.zeros((size, size), np.float32)
            tm = np.zeros((size, size), np.float32)
            pf, pm = f[r : r + size, c : c + size], m[r : r + size, c : c + size]
            tf[: pf.shape[0], : pf.shape[1]] = pf
            tm[: pm.shape[0], : pm.shape[1]] = pm
            tiles_f.append(tf)
            tiles_m.append(tm)
    return np.stack(tiles_f), np.stack(tiles_m)
