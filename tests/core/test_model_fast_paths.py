"""The integer-shift cost volume, the head bottleneck and contrast augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_discreg.core.config import DataConfig, ModelConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.learning import model as model_mod
from napari_discreg.core.learning.model import DiscreteRegistrationNet, correlation_volume
from napari_discreg.core.learning.train import source_pairs
from napari_discreg.core.registration.label_grid import label_offsets


def _features(seed: int, b: int = 2, c: int = 6, h2: int = 12, w2: int = 10):
    g = torch.Generator().manual_seed(seed)
    ff = torch.randn(b, c, h2, w2, generator=g, dtype=torch.float64, requires_grad=True)
    mf = torch.randn(b, c, h2, w2, generator=g, dtype=torch.float64, requires_grad=True)
    return ff, mf


@pytest.mark.parametrize(("stride", "k", "q"), [(4, 7, 3.0), (2, 5, 4.0), (4, 15, 7.0)])
def test_shift_volume_equals_grid_sample(monkeypatch, stride, k, q):
    ff, mf = _features(stride + k)
    h, w = 2 * ff.shape[-2] // stride, 2 * ff.shape[-1] // stride
    offsets = label_offsets(k, q, dtype=torch.float64)
    assert model_mod.integer_shift_spacing(offsets, stride) is not None
    fast = correlation_volume(ff, mf, offsets, stride, (h, w))
    grad = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * grad).sum(), [ff, mf])
    monkeypatch.setattr(model_mod, "integer_shift_spacing", lambda *a: None)
    ref = correlation_volume(ff, mf, offsets, stride, (h, w))
    g_ref = torch.autograd.grad((ref * grad).sum(), [ff, mf])
    # includes the control points whose candidates leave the image (border clamping)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_shift_volume_gradcheck():
    ff, mf = _features(0, b=1, c=2, h2=4, w2=4)
    offsets = label_offsets(3, 1.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: correlation_volume(a, b, offsets, 4, (2, 2)), (ff, mf)
    )


@pytest.mark.parametrize(("stride", "k", "q"), [(3, 7, 3.0), (4, 7, 1.5), (4, 5, 3.0)])
def test_non_integer_layouts_use_grid_sample(stride, k, q):
    assert model_mod.integer_shift_spacing(label_offsets(k, q), stride) is None


def test_head_bottleneck_is_smaller_and_old_configs_keep_the_full_head():
    small = DiscreteRegistrationNet(ModelConfig(head_bottleneck=32))
    full = DiscreteRegistrationNet(ModelConfig(head_bottleneck=0))
    n_small = sum(p.numel() for p in small.F1.parameters())
    n_full = sum(p.numel() for p in full.F1.parameters())
    assert n_small < 0.6 * n_full  # the 3 x 3 x 225 x 64 first layer was half the head
    old = ModelConfig().to_dict()
    del old["head_bottleneck"]  # a checkpoint written before the field existed
    assert ModelConfig.from_dict(old).head_bottleneck == 0
    with pytest.raises(ValueError, match="head_bottleneck"):
        ModelConfig(head_bottleneck=-1)


def test_augmented_pairs_differ_in_contrast_and_keep_the_geometry():
    cfg = DataConfig(size=64)
    template = data.load_template(64)
    rng = np.random.default_rng(0)
    pair = data.make_pair(template, 60, data.AUGMENTED, data.AUGMENTED, rng, cfg)
    assert pair.fixed.shape == pair.moving.shape == (64, 64)
    assert np.isfinite(pair.fixed).all() and 0 <= pair.fixed.min() <= pair.fixed.max() <= 1
    # two independent appearances of the same slice: not one the other's copy
    fg = template.mask[60] > 0
    unwarped = data.warp_numpy(pair.moving, pair.displacement)
    assert abs(np.corrcoef(unwarped[fg], pair.fixed[fg])[0, 1]) < 0.999
    # background stays dark in both
    assert pair.moving[~fg].mean() < 0.2
    looks = {
        round(float(data.make_pair(template, 60, "aug", "aug", rng, cfg).moving[fg].mean()), 2)
        for _ in range(6)
    }
    assert len(looks) > 3  # the appearance changes from draw to draw
    with pytest.raises(ValueError, match="unknown contrast"):
        data.make_pair(template, 60, "t3", "t1", rng, cfg)


def test_source_pairs_with_and_without_augmentation():
    assert source_pairs(("t1", "t2"), False) == (("t1", "t1"), ("t2", "t2"))
    aug = source_pairs(("t1", "t2"), True)
    assert aug.count((data.AUGMENTED, data.AUGMENTED)) == 2 and len(aug) == 4
