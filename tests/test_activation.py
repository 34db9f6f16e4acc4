"""Activation sparsity: exact densities, shared masks, BN statistics over kept positions, gradients."""

from __future__ import annotations

import pytest
import torch

import dst_prune
from dst_prune.compat.activation import SparseActivation, SparseBatchNorm, checkerboard


def kept(module, x):
    return module(x) != 0


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_random_masks_have_exact_density_shared_across_batch_and_channels(mode):
    module = SparseActivation(mode, density=0.3)
    out = kept(module, torch.ones(4, 3, 8, 8))
    assert int(out[0, 0].sum()) == round(0.3 * 64) == 19
    assert (out == out[0, 0]).all()


def test_structured_checkerboards_are_the_strided_patterns():
    assert checkerboard((4, 4), 0.25).nonzero().tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    assert checkerboard((2, 2), 0.5).tolist() == [[True, False], [False, True]]
    assert checkerboard((2, 2), 0.75).tolist() == [[True, True], [True, False]]
    for q in (1, 2, 3):
        module = SparseActivation("structured", density=0.25 * q)
        assert int(kept(module, torch.ones(2, 3, 8, 8))[0, 0].sum()) == 16 * q


def test_dynamic_redraws_in_training_and_scales_by_density_in_evaluation():
    torch.manual_seed(0)
    module = SparseActivation("dynamic", density=0.5)
    x = torch.ones(1, 1, 8, 8)
    assert not torch.equal(kept(module, x), kept(module, x))
    module.eval()
    assert torch.equal(module(x * 3), x * 1.5)


def test_static_mask_is_fixed_seeded_and_saved():
    a, b = SparseActivation("static", 0.5, size=(6, 6), seed=1), SparseActivation("static", 0.5, seed=1)
    x = torch.ones(2, 4, 6, 6)
    assert torch.equal(kept(a, x), kept(a, x)) and torch.equal(kept(a, x), kept(b, x))
    assert "mask" in a.state_dict() and a.state_dict()["mask"].dtype == torch.bool
    a.eval()
    assert torch.equal(kept(a, x), kept(b, x))
    with pytest.raises(dst_prune.DSTError, match="A fixed mask needs a fixed input size"):
        a(torch.ones(1, 4, 8, 8))


def test_achieved_sparsity_and_lp_norm_for_regularization():
    module = SparseActivation("structured", density=0.25, norm_p=1)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = module(torch.relu(x))
    assert module.achieved_sparsity == pytest.approx(float((out == 0).float().mean()))
    assert module.achieved_sparsity >= 0.75
    assert torch.allclose(module.norm, out.abs().sum())
    module.norm.backward()
    assert x.grad is not None and x.grad[:, :, 1].abs().sum() == 0  # odd rows are dropped


def test_sparse_batchnorm_statistics_are_those_of_the_kept_positions():
    torch.manual_seed(0)
    module = SparseBatchNorm("static", density=0.25, num_features=3, momentum=1.0, size=(4, 4))
    x = torch.randn(5, 3, 4, 4) * 3 + 2
    x.requires_grad_(True)
    out = module(x)
    mask = module.sparse.mask
    values = x.detach().permute(1, 0, 2, 3)[:, :, mask]  # (C, N, kept)
    flat = values.reshape(3, -1)
    assert torch.allclose(module.running_mean, flat.mean(1), atol=1e-5)
    assert torch.allclose(module.running_var, flat.var(1, unbiased=True), atol=1e-4)
    normalized = out.detach().permute(1, 0, 2, 3)[:, :, mask].reshape(3, -1)
    assert torch.allclose(normalized.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(normalized.var(1, unbiased=False), torch.ones(3), atol=1e-3)
    assert not out.detach()[:, :, ~mask].any()  # dropped positions stay zero
    out.pow(2).sum().backward()
    assert not x.grad[:, :, ~mask].any() and x.grad[:, :, mask].abs().sum() > 0


def test_dynamic_sparse_batchnorm_in_evaluation_uses_running_statistics_everywhere():
    module = SparseBatchNorm("dynamic", density=0.5, num_features=2)
    module(torch.randn(4, 2, 6, 6))
    module.eval()
    x = torch.randn(1, 2, 6, 6)
    expected = (x - module.running_mean.view(1, -1, 1, 1)) / torch.sqrt(module.running_var.view(1, -1, 1, 1) + 1e-5)
    assert torch.allclose(module(x), expected, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "sometimes"}, "mode='sometimes' is unknown; valid choices: static, dynamic, structured"),
    ({"density": 0}, "density must be a number in (0, 1]"),
    ({"mode": "structured", "density": 0.3}, "density=0.3 is not a structured (checkerboard) density"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(dst_prune.DSTError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SparseActivation(**kwargs)
    with pytest.raises(dst_prune.DSTError, match="num_features must be the"):
        SparseBatchNorm("static", 0.5, num_features=0)
