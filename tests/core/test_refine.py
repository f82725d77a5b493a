"""Instance-optimisation refinement: MIND-SSC descriptors and refine_field / register(refine=)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_discreg as nd
from napari_discreg.core.config import DataConfig, RefineConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.registration.metrics import end_point_error
from napari_discreg.core.registration.mind import mind_ssc
from napari_discreg.core.registration.preprocess import network_input
from napari_discreg.core.registration.refine import refine_field


def _tensor(image):
    return network_input(image, 1)


def test_mind_is_invariant_to_affine_and_inverted_intensities():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((1, 1, 32, 40)).astype(np.float64))
    ref = mind_ssc(img)
    assert ref.shape == (1, 6, 32, 40)
    assert float(ref.min()) > 0 and float(ref.max()) <= 1.0 + 1e-12
    torch.testing.assert_close(mind_ssc(3.0 * img + 7.0), ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(mind_ssc(1.0 - img), ref, rtol=1e-6, atol=1e-9)


def test_mind_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        mind_ssc(torch.zeros(1, 2, 8, 8))


def test_zero_steps_return_the_initial_field(pair):
    f, m = _tensor(pair.fixed), _tensor(pair.moving)
    init = torch.randn(1, 2, *pair.fixed.shape)
    out = refine_field(f, m, init, RefineConfig(steps=0))
    assert torch.equal(out, init)


def test_refinement_recovers_a_multimodal_deformation_from_zero(pair):
    f, m = _tensor(pair.fixed), _tensor(pair.moving)
    identity = end_point_error(np.zeros_like(pair.displacement), pair.displacement, pair.mask)
    out = refine_field(f, m, None, RefineConfig(steps=40))
    epe = end_point_error(out[0].numpy(), pair.displacement, pair.mask)
    assert out.shape == (1, 2, *pair.fixed.shape) and not out.requires_grad
    assert epe < 0.5 * identity, (epe, identity)


def test_a_start_worse_than_no_motion_is_replaced_by_the_zero_field(pair):
    f, m = _tensor(pair.fixed), _tensor(pair.moving)
    cfg = RefineConfig(steps=5)
    wrong = torch.zeros(1, 2, *pair.fixed.shape)
    wrong[:, 0] = 6.0  # far off everywhere
    torch.testing.assert_close(refine_field(f, m, wrong, cfg), refine_field(f, m, None, cfg))
    # a good start is kept: starting from the truth ends nearer the truth than from zero
    truth = torch.from_numpy(pair.displacement)[None]
    from_truth = refine_field(f, m, truth, cfg)
    epe = end_point_error(from_truth[0].numpy(), pair.displacement, pair.mask)
    from_zero = end_point_error(
        refine_field(f, m, None, cfg)[0].numpy(), pair.displacement, pair.mask
    )
    assert epe < from_zero


def _mind_cost(fixed, warped):
    return float(((mind_ssc(_tensor(fixed)) - mind_ssc(_tensor(warped))) ** 2).mean())


def test_register_guard_falls_back_to_identity_when_the_network_makes_it_worse(pair):
    from napari_discreg.core.config import ModelConfig
    from napari_discreg.core.learning.model import DiscreteRegistrationNet

    # an untrained model with a strong random bias: a large, wrong field
    torch.manual_seed(0)
    bad = DiscreteRegistrationNet(ModelConfig()).eval()
    with torch.no_grad():
        for head in (bad.F1, bad.F2):
            last = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
            last.bias.zero_()
            last.bias[0] = 50.0  # every control point: the corner label (-7, -7) px
    raw = nd.register(
        pair.fixed, pair.moving, model=bad, method="network", guard=False, prealign="none"
    )
    assert not raw.identity_fallback and np.abs(raw.displacement).max() > 5
    assert _mind_cost(pair.fixed, raw.warped) > _mind_cost(pair.fixed, pair.moving)
    guarded = nd.register(pair.fixed, pair.moving, model=bad, method="network", prealign="none")
    assert guarded.identity_fallback
    np.testing.assert_array_equal(guarded.displacement, 0)
    np.testing.assert_allclose(guarded.warped, pair.moving, atol=1e-4)  # float32 resampling
    # the network's outputs are still reported as they are
    np.testing.assert_array_equal(guarded.probabilities, raw.probabilities)


def test_register_guard_keeps_a_field_that_helps(pair, shipped_model):
    kept = nd.register(pair.fixed, pair.moving, model=shipped_model, method="network")
    raw = nd.register(pair.fixed, pair.moving, model=shipped_model, method="network", guard=False)
    assert not kept.identity_fallback
    np.testing.assert_array_equal(kept.displacement, raw.displacement)


def test_a_coarse_level_reaches_larger_displacements():
    cfg = DataConfig(size=128, max_displacement=10.0)
    big = data.make_pair(data.load_template(128), 110, "t1", "t2", np.random.default_rng(5), cfg)
    f, m = _tensor(big.fixed), _tensor(big.moving)
    epe = {
        levels: end_point_error(
            refine_field(f, m, None, RefineConfig(steps=40, levels=levels))[0].numpy(),
            big.displacement,
            big.mask,
        )
        for levels in (1, 2)
    }
    assert epe[2] < epe[1], epe
    with pytest.raises(ValueError, match="levels"):
        RefineConfig(levels=0)


def test_refinement_works_on_sizes_that_are_not_multiples_of_the_grid(pair):
    f, m = _tensor(pair.fixed[:-3, :-1]), _tensor(pair.moving[:-3, :-1])
    out = refine_field(f, m, None, RefineConfig(steps=3, grid_stride=4))
    assert out.shape == (1, 2, pair.fixed.shape[0] - 3, pair.fixed.shape[0] - 1)
    assert torch.isfinite(out).all()


def test_refinement_input_errors(pair):
    f = _tensor(pair.fixed)
    with pytest.raises(ValueError, match="one shape"):
        refine_field(f, f[..., :-1], None)
    with pytest.raises(ValueError, match="initial field"):
        refine_field(f, f, torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="steps must be >= 0"):
        RefineConfig(steps=-1)
    with pytest.raises(ValueError, match="grid_stride"):
        RefineConfig(grid_stride=0)


def test_register_refine_improves_the_shipped_model_on_t1_t2(pair, shipped_model):
    # the contrast-augmented shipped model is already far better than identity on T1/T2
    # before any adaptation; the refinement must still lower its error
    # the pair shares one grid: no pre-alignment, so that both start from the same place
    plain = nd.register(
        pair.fixed, pair.moving, model=shipped_model, method="network", prealign="none"
    )
    refined = nd.register(
        pair.fixed, pair.moving, model=shipped_model, refine=True, prealign="none"
    )
    assert refined.method == "network+adam"
    assert plain.refine_steps == 0 and refined.refine_steps == RefineConfig().steps
    e_plain = end_point_error(plain.displacement, pair.displacement, pair.mask)
    e_refined = end_point_error(refined.displacement, pair.displacement, pair.mask)
    e_identity = end_point_error(np.zeros_like(pair.displacement), pair.displacement, pair.mask)
    assert e_plain < 0.5 * e_identity, (e_plain, e_identity)
    assert e_refined < 0.9 * e_plain, (e_refined, e_plain)
    # the network's outputs are untouched; no gradient is left on the model
    np.testing.assert_array_equal(plain.probabilities, refined.probabilities)
    assert all(p.grad is None for p in shipped_model.parameters())
    short = nd.register(pair.fixed, pair.moving, model=shipped_model, refine=5)
    assert short.refine_steps == 5


@pytest.mark.parametrize("bad", [-1, "yes", 1.5])
def test_register_rejects_bad_refine_values(pair, shipped_model, bad):
    with pytest.raises((ValueError, TypeError), match="refine"):
        nd.register(pair.fixed, pair.moving, model=shipped_model, refine=bad)
