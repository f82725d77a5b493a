"""Optional instance optimisation after the network: a few Adam steps on the field.

The network's field is a discrete estimate (1 px bins at stride-4 control points,
and only as good as the network is on this contrast pair). Like PDD-Net (Heinrich,
MICCAI 2019) and the Learn2Reg baselines, :func:`refine_field` then optimises the
displacement of this one pair directly, with

* a modality-independent similarity: MIND-SSC self-similarity descriptors
  (Heinrich et al., MICCAI 2013) of fixed and moving, compared by squared
  differences after warping the moving descriptors;
* a diffusion regulariser (squared finite differences of the field);
* the field held on a coarse grid (``grid_stride``), bilinearly upsampled, so that
  the optimisation is cheap and the result smooth.

Everything is plain torch on the padded, normalised (B, 1, H, W) tensors that the
network reads; it runs on the same device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import RefineConfig
from .mind import mind_ssc
from .preprocess import check_tensor_pair, pad_to_multiple
from .warp import control_point_field, upsample_field, warp

__all__ = ["no_worse_than_identity", "refine_field", "refine_step_count"]


def no_worse_than_identity(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    field: torch.Tensor,
    *,
    radius: int = RefineConfig.radius,
    dilation: int = RefineConfig.dilation,
    descriptors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, ``field`` or the zero field, whichever matches better by MIND-SSC.

    A network that does not know a pair's contrasts can predict a field further from
    the truth than no motion at all; the MIND-SSC distance (mean squared difference of
    the descriptors of fixed and of the warped moving image, no labels involved) tells
    the two apart. The moving image is warped before its descriptors are taken:
    warping the descriptors instead interpolates them, which lowers their distance for
    any non-zero field and would favour a wrong field over no motion. ``fixed``,
    ``moving`` (B, 1, H, W), ``field`` (B, 2, H, W); ``descriptors``: those of fixed and
    moving when already computed. Returns the chosen fields and a (B,) bool tensor,
    True where the zero field was chosen.
    """
    with torch.no_grad():
        if descriptors is None:
            descriptors = mind_ssc(fixed, radius, dilation), mind_ssc(moving, radius, dilation)
        mind_f, mind_m = descriptors
        warped = mind_ssc(warp(moving, field), radius, dilation)
        cost_field = ((mind_f - warped) ** 2).mean(dim=(1, 2, 3))
        cost_zero = ((mind_f - mind_m) ** 2).mean(dim=(1, 2, 3))
        use_zero = cost_zero <= cost_field
        chosen = torch.where(use_zero.view(-1, 1, 1, 1), torch.zeros_like(field), field)
    return chosen.detach(), use_zero


def _diffusion(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward differences of a (B, 2, h, w) field along both axes."""
    dr = field[..., 1:, :] - field[..., :-1, :]
    dc = field[..., :, 1:] - field[..., :, :-1]
    return (dr**2).mean() + (dc**2).mean()


MIN_LEVEL_SIDE = 8
"""A coarse level runs where the image keeps this many pixels a side (the B-spline
pyramid needs more: :func:`~napari_discreg.core.registration.bspline.level_factors`)."""


def refine_levels(config: RefineConfig, shape: tuple[int, int]) -> list[int]:
    """Downsampling factors of the levels :func:`refine_field` runs, coarse to fine."""
    factors = [2**k for k in reversed(range(config.levels))]
    return [f for f in factors if f == 1 or min(shape) >= MIN_LEVEL_SIDE * f]


def refine_step_count(config: RefineConfig, shape: tuple[int, int]) -> int:
    """How many Adam steps :func:`refine_field` takes for images of ``shape`` (all levels)."""
    return config.steps * len(refine_levels(config, shape))


def refine_field(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial: torch.Tensor | None = None,
    config: RefineConfig | None = None,
    *,
    callback: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Refine a displacement field (B, 2, H, W) for normalised images (B, 1, H, W).

    Parameters
    ----------
    fixed, moving : torch.Tensor
        Images on the same device, intensities normalised to about [0, 1].
    initial : torch.Tensor, optional
        Starting field in pixels (the network's); default zero. Per pair, the zero field
        is used instead when it matches better by the MIND distance.
    config : RefineConfig, optional
    callback : callable, optional
        Called after every Adam step (progress; an exception it raises, such as a stop
        request, ends the refinement and propagates).

    Returns
    -------
    torch.Tensor
        The refined field (B, 2, H, W), detached. ``config.steps == 0`` returns the
        initial field unchanged.
    """
    cfg = config or RefineConfig()
    check_tensor_pair(fixed, moving, initial, caller="refine_field")
    b, _, h, w = fixed.shape
    if initial is None:
        initial = fixed.new_zeros((b, 2, h, w))
    if cfg.steps == 0:
        return initial.detach()

    def mind(image: torch.Tensor) -> torch.Tensor:
        return mind_ssc(image, cfg.radius, cfg.dilation)

    with torch.no_grad():
        mind_f, mind_m = mind(fixed), mind(moving)
    # start from whichever of the initial and the zero field matches better
    field, _ = no_worse_than_identity(
        fixed,
        moving,
        initial,
        radius=cfg.radius,
        dilation=cfg.dilation,
        descriptors=(mind_f, mind_m),
    )
    for f in refine_levels(cfg, (h, w)):
        if f == 1:
            field = _refine_level(fixed, moving, field, cfg, mind_f, mind_m, callback)
            continue
        size = (h + (-h) % f, w + (-w) % f)
        fl = F.avg_pool2d(pad_to_multiple(fixed, f), f)
        ml = F.avg_pool2d(pad_to_multiple(moving, f), f)
        coarse = control_point_field(pad_to_multiple(field, f), f) / f
        coarse = _refine_level(fl, ml, coarse, cfg, mind(fl), mind(ml), callback)
        field = upsample_field(coarse * f, f, size)[..., :h, :w]
    return field.detach()


def _refine_level(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial: torch.Tensor,
    cfg: RefineConfig,
    mind_f: torch.Tensor,
    mind_m: torch.Tensor,
    callback: Callable[[], None] | None = None,
) -> torch.Tensor:
    """``cfg.steps`` Adam steps on a field at one resolution (descriptors given)."""
    h, w = fixed.shape[-2:]
    s = cfg.grid_stride
    with torch.enable_grad():
        with torch.no_grad():
            # pad to a multiple of the grid so that pooling and upsampling line up
            ph, pw = (-h) % s, (-w) % s
            start = F.pad(initial.detach(), (0, pw, 0, ph), mode="replicate")
            size = (h + ph, w + pw)
            coarse0 = control_point_field(start, s)
            # the initial field's fine detail that the coarse grid cannot hold is kept
            detail = start - upsample_field(coarse0, s, size)
        coarse = coarse0.clone().requires_grad_(True)
        opt = torch.optim.Adam([coarse], lr=cfg.lr)
        for _ in range(cfg.steps):
            dense = (upsample_field(coarse, s, size) + detail)[..., :h, :w]
            warped = warp(mind_m, dense)
            loss = ((mind_f - warped) ** 2).mean() + cfg.smoothness * _diffusion(coarse)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if callback is not None:
                callback()
    with torch.no_grad():
        dense = (upsample_field(coarse, s, size) + detail)[..., :h, :w]
    return dense.detach()
