"""Structured groups: kernels, channels and n:m blocks are pruned, grown and counted as wholes, for every method."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import SmallCNN, assert_invariants, small_cnn_batch
from torch import nn

import dst_prune
from dst_prune.groups import Grouping, make_grouping

EXTRA = {"dsr": {"pruning_threshold": 0.05}, "rigl": {"total_steps": 40}, "snfs": {"total_steps": 40},
         "gmp": {"total_steps": 40}, "granet": {"total_steps": 40}}


def test_kernel_granularity_keeps_the_kernels_with_the_largest_mean_magnitude():
    conv = nn.Conv2d(2, 2, 2, bias=False)
    with torch.no_grad():  # kernel mean |w|: (0,0) 1.0, (0,1) 0.1, (1,0) 0.5, (1,1) 0.7
        conv.weight.copy_(torch.tensor([1.0, 0.1, 0.5, 0.7]).view(2, 2, 1, 1).expand(2, 2, 2, 2) *
                          torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
    dst = dst_prune.apply(conv, sparsity=0.5, granularity="kernel", dense_stem_and_head=False)
    kept = conv.weight_mask.all(-1).all(-1)
    assert kept.tolist() == [[True, False], [False, True]]
    assert torch.equal(conv.weight_mask, kept[:, :, None, None].expand(2, 2, 2, 2))
    assert dst.budget == 2 and dst.n_groups == 4


def test_channel_granularity_keeps_whole_output_channels():
    linear = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.0, 0.0], [0.2, 0.2, 0.2], [0.0, 0.0, 0.5]]))
    dst_prune.apply(linear, sparsity=0.5, granularity="channel", dense_stem_and_head=False)
    assert linear.weight_mask.all(1).tolist() == [False, True, True, False]  # mean |w| 0.1, 0.3, 0.2, 0.167
    assert (linear.weight_mask.all(1) == linear.weight_mask.any(1)).all()


def test_two_four_keeps_the_two_largest_of_every_four_inputs():
    linear = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.1, -0.9, 0.3, 0.2, 0.5, 0.5, -0.5, 0.0]]))
    dst_prune.apply(linear, sparsity=0.5, granularity="2:4", dense_stem_and_head=False)
    assert linear.weight_mask.tolist() == [[False, True, True, False, True, True, False, False]]


def test_two_four_on_a_conv_blocks_along_input_channels():
    conv = nn.Conv2d(8, 2, 3, bias=False)
    dst_prune.apply(conv, sparsity=0.5, granularity="2:4", dense_stem_and_head=False)
    per_block = conv.weight_mask.movedim(1, -1).reshape(-1, 4).sum(1)
    assert (per_block == 2).all() and per_block.numel() == 2 * 9 * 2


def test_dsr_prunes_kernels_whose_mean_magnitude_is_below_the_threshold():
    conv = nn.Conv2d(1, 3, 2, bias=False)
    with torch.no_grad():  # kernel means 0.5, 0.0005 (one weight 0.002, below H on average), 0.3
        conv.weight.copy_(torch.tensor([0.5, 0.0, 0.3]).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone())
        conv.weight[1, 0, 0, 0] = 0.002
    dst = dst_prune.apply(conv, sparsity=0.0, granularity="kernel", dense_stem_and_head=False, pruning_threshold=1e-3)
    assert dst.prune_by_threshold() == 1
    assert conv.weight_mask.all(-1).all(-1).flatten().tolist() == [True, False, True]


@pytest.mark.parametrize("granularity", ["element", "kernel", "channel", "2:4"])
def test_below_threshold_is_the_mean_magnitude_comparison(granularity):
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3) * 0.01
    weight[0, 0, 0, :] = torch.tensor([0.005, -0.005, 0.0])  # exactly at +-threshold, and zero
    weight[1, 1] = 0.0  # a whole zero kernel
    weight[2, 0, 0, 0] = 0.01
    grouping = make_grouping(granularity, weight.shape)
    for dtype in (torch.float32, torch.bfloat16):
        # the last is just above bf16(0.01) = 0.010009765625 and rounds down to it in bf16
        for threshold in (0.005, 1e-3, 0.1, 0.010009765625 * (1 + 1e-4)):
            w = weight.to(dtype)
            assert torch.equal(grouping.below(w, threshold), grouping.reduce(w) < threshold), (dtype, threshold)


def test_rigl_with_channels_grows_the_channel_with_the_largest_mean_gradient():
    linear = nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.9, 0.9], [0.1, 0.1], [0.0, 0.0], [0.0, 0.0]]))
    dst = dst_prune.apply(linear, sparsity=0.5, granularity="channel", method="rigl", drop_fraction=0.5,
                          decay="constant", total_steps=100, dense_stem_and_head=False)
    assert linear.weight_mask.all(1).tolist() == [True, True, False, False]
    dst.capture_dense_gradients()
    out = linear(torch.eye(2))  # out[i, j] = W[j, i], so the loss below has dL/dW = G
    gradient = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.2, 0.2], [0.0, 0.9]])  # channel means 0.2 and 0.45
    (out * gradient.T).sum().backward()
    dst.reparameterize()  # drops channel 1 (the weaker active one), grows channel 3
    assert linear.weight_mask.all(1).tolist() == [True, False, False, True]
    assert not linear.weight_orig[3].any()  # regrown at zero


@pytest.mark.parametrize("granularity", ["kernel", "channel", "2:4"])
@pytest.mark.parametrize("method", dst_prune.list_methods())
def test_every_method_keeps_whole_groups_and_exact_group_counts(method, granularity):
    if granularity == "2:4" and method in ("gmp", "granet"):
        pytest.skip("gradual pruning cannot keep a fixed n:m pattern (refused, tested below)")
    if method == "srigl":
        pytest.skip("srigl keeps a constant fan-in of single weights: other granularities are refused (test_srigl)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsity = 0.5 if granularity == "2:4" else 0.7
    dst = dst_prune.apply(model, sparsity=sparsity, method=method, granularity=granularity, optimizer=optimizer,
                          update_every=2, dense_stem_and_head=False, init="random", **EXTRA.get(method, {}))
    x, y = torch.randn(6, 4, 4, 4), torch.randint(0, 4, (6,))
    moved = 0
    for _ in range(40):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if dst.step():
            moved += sum(dst.history[-1]["grown"])
            assert sum(t.active_groups() for t in dst.targets) == dst.budget
            assert_invariants(dst, optimizer)
            for t in dst.targets:
                groups = t.group_mask()
                assert torch.equal(t.grouping.expand(groups), t.mask), f"{t.name}: not whole groups"
                if granularity == "2:4":
                    assert (t.grouping.to_blocks(t.mask).sum(1) == 2).all(), f"{t.name}: a block lost 2:4"
    assert dst.budget == round((1 - sparsity) * dst.n_groups)
    if method not in ("static", "gmp"):
        assert moved > 0


def test_structured_training_of_a_real_model_with_channels_last():
    model = SmallCNN().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dst = dst_prune.apply(model, sparsity=0.5, method="set", granularity="kernel", optimizer=optimizer,
                          update_every=1)
    x, y = small_cnn_batch()
    for _ in range(3):
        nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        dst.step()
        assert_invariants(dst, optimizer)
    conv = dst.targets[0]
    assert torch.equal(conv.grouping.expand(conv.group_mask()), conv.mask)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"granularity": "row"}, "granularity='row' is unknown; valid choices: element, kernel, channel, or 'n:m'"),
    ({"granularity": "4:2"}, "granularity='4:2' is unknown"),
    ({"granularity": "2:4"}, "granularity='2:4' keeps 2 of every 4 weights, so sparsity must be 0.5; received "
                             "sparsity=0.9"),
    ({"granularity": "2:4", "sparsity": 0.5, "distribution": "erk"}, "pass distribution='uniform'"),
    ({"granularity": "2:4", "sparsity": 0.5, "method": "gmp", "total_steps": 10},
     "gradual pruning cannot keep it"),
    ({"granularity": "2:8", "sparsity": 0.75}, "conv.weight has 4 inputs (dim 1), not a multiple of 8"),
])
def test_granularity_errors(kwargs, message):
    model = SmallCNN()
    with pytest.raises(dst_prune.DSTError, match=re.escape(message)):
        dst_prune.apply(model, **{"sparsity": 0.9, **kwargs})
    assert not dst_prune.is_sparse(model)


def test_load_sparse_state_dict_checks_the_groups():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3))
    dst_prune.apply(model, sparsity=0.5, granularity="kernel", dense_stem_and_head=False)
    state = dst_prune.pruned_state_dict(model)
    fresh = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3))
    dst = dst_prune.load_sparse_state_dict(fresh, state, granularity="kernel")
    assert dst.budget == 4 and isinstance(dst.targets[0].grouping, Grouping)
    state["0.weight_mask"][0, 0, 0, 0] = ~state["0.weight_mask"][0, 0, 0, 0]
    with pytest.raises(dst_prune.DSTError, match="is not made of whole kernel groups"):
        dst_prune.load_sparse_state_dict(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)), state,
                                         granularity="kernel")
