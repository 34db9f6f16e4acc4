"""DSR (Mostafa & Wang 2019, Algorithm 1) on small tensors with hand-computed expectations."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import dst_prune
from dst_prune.algorithms.dsr import DSR


def layered(layers: list[list[float]], size: int = 4, **kwargs) -> tuple[nn.Module, dst_prune.DynamicSparsity]:
    """Linear(size, size) layers whose first weights (row-major) are the given values, active; the rest zero.

    Built through `load_sparse_state_dict`, the public way to start from given masks.
    """
    model = nn.Sequential(*[nn.Linear(size, size, bias=False) for _ in layers])
    state = {}
    for i, values in enumerate(layers):
        weight, mask = torch.zeros(size * size), torch.zeros(size * size, dtype=torch.bool)
        weight[: len(values)], mask[: len(values)] = torch.tensor(values), True
        state[f"{i}.weight_orig"], state[f"{i}.weight_mask"] = weight.view(size, size), mask.view(size, size)
    return model, dst_prune.load_sparse_state_dict(model, state, **kwargs)


def flat_mask(dst, layer):
    return dst.targets[layer].mask.reshape(-1)


def test_prune_by_threshold_prunes_exactly_the_active_weights_below_h():
    model, dst = layered([[0.9, -0.0005, 0.8, 0.002], [0.5, 0.0009, -0.6]], pruning_threshold=1e-3)
    assert dst.prune_by_threshold() == 2
    assert flat_mask(dst, 0)[:4].tolist() == [True, False, True, True]
    assert flat_mask(dst, 1)[:3].tolist() == [True, False, True]
    assert dst.algorithm.freed == (1, 1) and dst.algorithm.surviving == (3, 2)
    assert model[0].weight_orig.reshape(-1)[1] == 0 and model[1].weight_orig.reshape(-1)[1] == 0


@pytest.mark.parametrize(("fraction", "expected"), [(1 / 32, 5e-4), (2 / 32, 1e-3), (4 / 32, 2e-3)])
def test_threshold_halves_when_too_many_doubles_when_too_few(fraction, expected):
    # 2 weights fall below H = 1e-3; N = 32 so K = fraction * 32 = 1, 2, 4:
    # 2 > 1.1 * 1 halves H, 2 is within 10% of 2, and 2 < 0.9 * 4 doubles it
    _, dst = layered([[0.9, -0.0005, 0.8], [0.5, 0.0009, -0.6]], target_fraction_to_prune=fraction)
    assert dst.algorithm.target_count == round(fraction * 32)
    dst.prune_by_threshold()
    assert dst.adjust_pruning_threshold() == pytest.approx(expected)


def test_reallocation_shares_follow_survivors_with_largest_remainder_rounding():
    # survivors R = 5, 3, 1 and 4 weights freed: ideal shares 4*5/9 = 2.22, 4*3/9 = 1.33, 4*1/9 = 0.44;
    # floors 2, 1, 0 and the one left over goes to the largest remainder (0.44): 2, 1, 1
    strong, weak = 0.5, 1e-4
    _, dst = layered([[strong] * 5 + [weak], [strong] * 3 + [weak], [strong] + [weak] * 2])
    dst.reparameterize()
    record = dst.history[-1]
    assert record["pruned"] == [1, 1, 2]
    assert record["grown"] == [2, 1, 1]
    assert record["active"] == [7, 4, 2]
    assert sum(record["active"]) == dst.budget == 13


def test_regrowth_avoids_positions_pruned_in_the_same_update():
    # layer 0 (2x2) has one zero that was never active and one weak weight; its share of the 2 freed
    # weights is 1 and the only allowed slot is the never-active zero, whatever the seed
    for seed in range(10):
        model, dst = layered([[0.5, 0.5, 1e-4], [0.5, 0.5, 1e-4]], size=2, seed=seed)
        dst.reparameterize()
        for layer in range(2):
            assert flat_mask(dst, layer).tolist() == [True, True, False, True]
            assert model[layer].weight_orig.reshape(-1)[3] == 0  # regrown at zero


def test_regrown_positions_are_new_zeros_with_zero_optimizer_state():
    model, dst = layered([[0.5] * 6 + [1e-4] * 2, [0.5] * 4 + [1e-4]], size=4, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # momentum everywhere, also where weights are masked
        optimizer.state[p]["momentum_buffer"] = torch.ones_like(p)
    dst.optimizer = optimizer
    before = [flat_mask(dst, i).clone() for i in range(2)]
    dst.reparameterize()
    for i, t in enumerate(dst.targets):
        after = t.mask.reshape(-1)
        pruned, grown = before[i] & ~after, after & ~before[i]
        assert int(pruned.sum()) == dst.history[-1]["pruned"][i] > 0
        assert int(grown.sum()) == dst.history[-1]["grown"][i]
        assert not (grown & pruned).any()
        buffer = optimizer.state[t.orig]["momentum_buffer"].reshape(-1)
        assert not t.orig.detach().reshape(-1)[grown | pruned].any()
        assert not buffer[grown | pruned].any()
        assert buffer[before[i] & after].eq(1).all()  # untouched survivors keep their state


def test_no_tensor_is_ever_emptied():
    # every weight of layer 1 is below H: its strongest one survives, so it keeps a share of the regrowth
    _, dst = layered([[0.9, 0.8, 0.7], [1e-4, -3e-4, 2e-4]], pruning_threshold=1e-3)
    dst.prune_by_threshold()
    assert flat_mask(dst, 1)[:3].tolist() == [False, True, False]
    assert dst.algorithm.surviving == (3, 1)
    dst.adjust_pruning_threshold()
    dst.reallocate_free_parameters()
    # 2 freed, shared 3:1 -> 1.5 and 0.5 -> floors 1 and 0, the tie of remainders goes to the lower index
    assert dst.history[-1]["active"] == [5, 1]
    for _ in range(5):
        dst.reparameterize()
        assert all(t.active() >= 1 for t in dst.targets)


def test_dense_layers_reuse_just_pruned_positions_to_keep_the_count():
    # a 2x2 layer with 4 active weights, 3 of them weak: no never-active zero exists, so the count can
    # only be kept by regrowing at just-pruned positions (at zero)
    _, dst = layered([[0.5, 1e-4, 1e-4, 1e-4]], size=2)
    dst.reparameterize()
    assert dst.targets[0].active() == 4 == dst.budget
    assert dst.history[-1]["pruned"] == [3] and dst.history[-1]["grown"] == [3]


def test_same_seed_same_masks_other_seed_other_masks():
    def run(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
        dst = dst_prune.apply(model, sparsity=0.8, dense_stem_and_head=False, seed=seed, pruning_threshold=0.05)
        for _ in range(3):
            dst.reparameterize()
        return [t.mask.clone() for t in dst.targets]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_step_reallocates_every_update_every_steps():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    dst = dst_prune.apply(model, sparsity=0.5, update_every=3, dense_stem_and_head=False)
    done = [dst.step() for _ in range(10)]
    assert [i + 1 for i, d in enumerate(done) if d] == [3, 6, 9]
    assert [r["step"] for r in dst.history] == [3, 6, 9] and dst.update_index == 3


def test_dsr_hyperparameters_are_validated():
    for kwargs, message in [({"target_fraction_to_prune": 0}, "target_fraction_to_prune must be a number in"),
                            ({"pruning_threshold": -1}, "pruning_threshold must be a number > 0"),
                            ({"delta": 1.5}, "delta must be a number in [0, 1)")]:
        with pytest.raises(dst_prune.DSTError, match=re.escape(message)):
            DSR.create(**kwargs)


def test_ties_a_weight_exactly_at_h_survives_and_the_lower_index_is_kept():
    # |w| < H is strict: 1e-3 itself survives. In layer 1 every weight is below H and two share the
    # largest magnitude; the one at the lower index is the one kept.
    _, dst = layered([[0.9, 1e-3, -1e-3, 5e-4], [2e-4, -4e-4, 4e-4, 1e-4]], pruning_threshold=1e-3)
    assert dst.prune_by_threshold() == 4
    assert flat_mask(dst, 0)[:4].tolist() == [True, True, True, False]
    assert flat_mask(dst, 1)[:4].tolist() == [False, True, False, False]


def test_magnitude_init_keeps_the_largest_weights_ties_to_the_lower_index():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -0.5, 0.3], [0.3, 0.2, -0.3]]))
        model[1].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    dst = dst_prune.apply(model, sparsity=0.5, dense_stem_and_head=False)
    assert model[0].weight_mask.tolist() == [[False, True, True], [True, False, False]]
    assert torch.equal(model[0].weight_orig, torch.tensor([[0.0, -0.5, 0.3], [0.3, 0.0, 0.0]]))
    assert model[1].weight_mask.tolist() == [[False, False], [True, True]]
    assert dst.budget == 5
