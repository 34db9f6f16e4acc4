"""SRigL (method='srigl'): constant fan-in after every update, exact budgets, neuron ablation, exports, resume."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import SmallCNN, assert_invariants, assert_unchanged, small_cnn_batch, snapshot
from torch import nn

import dst_prune
from dst_prune.algorithms.fan_in import neurons_for, plan_fan_in
from dst_prune.exporting.condensed import CondensedLinear


def fan_ins(target) -> tuple[int, set[int]]:
    """(active neurons, the set of their fan-ins) of a target, per output row along its layout."""
    rows = target.mask.movedim(target.grouping.layout[0], 0).reshape(target.mask.shape[target.grouping.layout[0]], -1)
    counts = rows.sum(1)
    return int((counts > 0).sum()), set(counts[counts > 0].tolist())


def assert_constant_fan_in(dst) -> None:
    for t in dst.targets:
        neurons, fans = fan_ins(t)
        assert neurons > 0 and len(fans) == 1, f"{t.name}: fan-ins {fans}"


def mlp(widths=(20, 16, 12, 4)) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def train(model, optimizer, dst, steps, batch, start=0):
    updates = 0
    for i in range(start, start + steps):
        x, y = batch(i)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if dst.step():
            updates += 1
            assert_invariants(dst, optimizer)
            assert_constant_fan_in(dst)
    return updates


def mlp_batch(i, inputs=20, classes=4):
    generator = torch.Generator().manual_seed(i)
    return torch.randn(16, inputs, generator=generator), torch.randint(0, classes, (16,), generator=generator)


def cnn_batch(i):
    return small_cnn_batch(n=4 + i % 3)


# --- the budget scheme ----------------------------------------------------------------------------------
def test_plan_is_exact_and_constant_for_many_layer_sets():
    rng = random.Random(0)
    for _ in range(500):
        outs = [rng.randint(1, 40) for _ in range(rng.randint(2, 4))]
        fans = [rng.randint(1, 60) for _ in outs]
        counts = [rng.randint(1, max(1, o * f // 2)) for o, f in zip(outs, fans)]  # at most half dense
        plan = plan_fan_in(counts, outs, fans, [f"l{i}" for i in range(len(outs))])
        assert sum(n * k for n, k in plan) == sum(counts)
        assert all(1 <= n <= o and 1 <= k <= f for (n, k), o, f in zip(plan, outs, fans))


def test_plan_fails_only_where_no_split_exists():
    rng = random.Random(1)
    for _ in range(300):
        outs, fans = [rng.randint(1, 30) for _ in range(2)], [rng.randint(1, 30) for _ in range(2)]
        counts = [rng.randint(1, o * f) for o, f in zip(outs, fans)]  # up to dense
        held = [{n * k for n in range(1, o + 1) for k in range(1, f + 1)} for o, f in zip(outs, fans)]
        possible = any(sum(counts) - v in held[1] for v in held[0])
        try:
            plan_fan_in(counts, outs, fans, ["a", "b"])
        except dst_prune.DSTError:
            assert not possible, (outs, fans, counts)


def test_plan_keeps_all_neurons_when_the_counts_divide():
    assert plan_fan_in([23400, 3000], [300, 100], [784, 300], ["a", "b"]) == [(300, 78), (100, 30)]
    # 26520 is no multiple of 100, so some neuron must start ablated: 6 of fc1's, which then holds 294 x 80
    assert plan_fan_in([23520, 3000], [300, 100], [784, 300], ["a", "b"]) == [(294, 80), (100, 30)]


def test_neurons_for_picks_the_smallest_divisor_at_or_above_the_wanted_count():
    assert neurons_for(12, 3, 4, 6) == 3
    assert neurons_for(12, 1, 4, 6) == 2  # 12 / 1 > 6 inputs: at least 2 neurons
    assert neurons_for(3000, 90, 100, 300) == 100
    assert neurons_for(3000, 74, 100, 300) == 75


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
def test_apply_gives_exact_budget_and_constant_fan_in(distribution):
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    for sparsity in (0.9, 0.95, 0.99):
        dst = dst_prune.apply(model, sparsity=sparsity, method="srigl", distribution=distribution, total_steps=10,
                              dense_stem_and_head=False)
        assert dst.budget == round((1 - sparsity) * dst.n_sparse) == sum(t.active() for t in dst.targets)
        assert_constant_fan_in(dst)
        dst_prune.remove(model)


def test_uniform_lenet_at_90_percent_has_no_ablated_neuron_and_one_fan_in_per_layer():
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    dst = dst_prune.apply(model, sparsity=0.9, method="srigl", total_steps=10, dense_stem_and_head=False)
    assert [fan_ins(t) for t in dst.targets] == [(300, {78}), (100, {31}), (10, {12})]


# --- updates --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_constant_fan_in_exact_budget_and_invariants_after_every_update_of_a_cnn(distribution):
    torch.manual_seed(0)
    model = SmallCNN().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = dst_prune.apply(model, sparsity=0.8, method="srigl", distribution=distribution, optimizer=optimizer,
                          update_every=2, total_steps=14, init="random", gamma_sal=0.6)
    assert_constant_fan_in(dst)
    assert train(model, optimizer, dst, 14, cnn_batch) >= 4
    assert dst.budget == round(0.2 * dst.n_sparse)
    assert sum(sum(r["grown"]) for r in dst.history) > 0


def test_hand_computed_ablation_and_per_neuron_regrowth():
    """4 neurons of fan-in 3 (budget 12); row 3's weights are the 3 weakest and it has no gradient."""
    weight = torch.tensor([[0.9, 0.8, 0.7, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.6, 0.5, 0.4],
                           [0.3, 0.0, 0.3, 0.0, 0.3, 0.0],
                           [0.0, 0.01, 0.0, 0.02, 0.0, 0.03]])
    gradient = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.0, 0.0],
                             [0.0, 0.4, 0.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0, 0.0, 0.6],
                             [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])

    def run(**hyperparameters):
        model = nn.Linear(6, 4, bias=False)
        dst = dst_prune.load_sparse_state_dict(model, {"weight_orig": weight, "weight_mask": weight != 0},
                                               method="srigl", drop_fraction=0.25, decay="constant",
                                               **hyperparameters)
        dst.capture_dense_gradients()
        (model(torch.eye(6)) * gradient.T).sum().backward()  # dL/dW = gradient
        dst.reparameterize()  # K = floor(0.25 * 12) = 3: row 3's weights; grown candidates (3, 7, 17)
        return model, dst

    model, dst = run()  # row 3: no salient weight < max(1, ceil(0.3 * 3)): ablated; 12 / 3 = 4 per row
    assert model.weight_mask.int().tolist() == [[1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1], [1, 0, 1, 0, 1, 1],
                                                [0, 0, 0, 0, 0, 0]]
    assert model.weight_orig[0, 3] == 0 and model.weight_orig[1, 1] == 0 and model.weight_orig[2, 5] == 0
    assert dst.history[-1]["ablated_neurons"] == 1 and dst.history[-1]["active_neurons"] == 3

    model, dst = run(gamma_sal=0.0, min_salient_weights=0)  # no ablation: row 3 regrows 3 (no gradient: first 3)
    assert model.weight_mask.int().tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 0, 1, 0, 1, 0],
                                                [1, 1, 1, 0, 0, 0]]
    assert model.weight_orig[3].tolist() == pytest.approx([0, 0.01, 0, 0, 0, 0])  # (3, 1) dropped and regrown: kept
    assert dst.history[-1]["ablated_neurons"] == 0


def test_a_neuron_with_enough_salient_gradient_is_not_ablated():
    """Row 1 of 2 loses its kept weights but its gradient makes 2 of its positions salient (>= ceil(0.3 * 4))."""
    weight = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.0, 0.0], [0.01, 0.02, 0.03, 0.04, 0.0, 0.0]])
    gradient = torch.tensor([[0.0] * 6, [0.0, 0.0, 0.0, 0.0, 0.5, 0.4]])
    model = nn.Linear(6, 2, bias=False)
    dst = dst_prune.load_sparse_state_dict(model, {"weight_orig": weight, "weight_mask": weight != 0},
                                           method="srigl", drop_fraction=0.5, decay="constant")
    dst.capture_dense_gradients()
    (model(torch.eye(6)) * gradient.T).sum().backward()
    dst.reparameterize()
    assert model.weight_mask.sum(1).tolist() == [4, 4] and model.weight_mask[1, 4:].all()
    assert dst.history[-1]["ablated_neurons"] == 0


def test_strong_ablation_grows_the_remaining_fan_in_and_keeps_the_budget():
    torch.manual_seed(0)
    model = mlp((20, 16, 12, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.75, method="srigl", optimizer=optimizer, update_every=1, total_steps=20,
                          gamma_sal=0.9, dense_stem_and_head=False)
    train(model, optimizer, dst, 12, mlp_batch)
    assert dst.history[-1]["ablated_neurons"] > 0
    counts = [t.active() for t in dst.targets]
    assert sum(counts) == dst.budget and counts == dst.history[0]["active"]  # no budget moves between layers


# --- exports ---------------------------------------------------------------------------------------------
def test_condensed_and_shrink_exports_equal_the_sparse_model_after_ablation():
    torch.manual_seed(0)
    model = mlp((20, 16, 12, 4))  # the head stays dense: shrink removes ablated rows of the hidden layers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.7, method="srigl", optimizer=optimizer, update_every=1, total_steps=20,
                          gamma_sal=0.9)
    train(model, optimizer, dst, 10, mlp_batch)
    assert any(fan_ins(t)[0] < t.shape[0] for t in dst.targets), "no neuron ablated"
    x = torch.randn(9, 20)
    model.eval()
    expected = model(x)
    condensed = dst_prune.export(model, format="condensed")
    assert isinstance(condensed[0], CondensedLinear)
    torch.testing.assert_close(condensed(x), expected, rtol=1e-5, atol=1e-6)
    shrunk = dst_prune.export(model, format="shrink")
    torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())


# --- state and resume -----------------------------------------------------------------------------------
def build(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.8, method="srigl", optimizer=optimizer, update_every=2, total_steps=10,
                          seed=7, gamma_sal=0.6)
    return model, optimizer, dst


def test_resume_is_bitwise_exact(tmp_path):
    straight = build()
    train(*straight, 10, cnn_batch)
    first = build()
    train(*first, 4, cnn_batch)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": first[0].state_dict(), "optimizer": first[1].state_dict(), "dst": first[2].state_dict()},
               path)
    model, optimizer, dst = build(seed=99)
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    dst.load_state_dict(checkpoint["dst"])
    train(model, optimizer, dst, 6, cnn_batch, start=4)
    reference = straight[0].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert dst.history == straight[2].history


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arguments", "named"), [({"gamma_sal": 1.5}, "gamma_sal"), ({"gamma_sal": "x"}, "gamma_sal"),
                                                 ({"min_salient_weights": -1}, "min_salient_weights"),
                                                 ({"min_salient_weights": 1.5}, "min_salient_weights"),
                                                 ({"drop_fraction": 2.0}, "drop_fraction"),
                                                 ({"granularity": "channel"}, "granularity"),
                                                 ({"include": ["fc1.bias"]}, "fc1.bias")])
def test_bad_arguments_are_refused_naming_them_and_leave_the_model_untouched(arguments, named):
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(dst_prune.DSTError, match=named):
        dst_prune.apply(model, sparsity=0.8, method="srigl", total_steps=10, **arguments)
    assert_unchanged(model, before)


def test_a_budget_no_constant_fan_in_can_hold_is_refused():
    model = nn.Linear(10, 10, bias=False)  # 13 weights: 13 neurons of 1 or 1 neuron of 13, neither fits 10 x 10
    with pytest.raises(dst_prune.DSTError, match=r"srigl.*slightly different sparsity"):
        dst_prune.apply(model, sparsity=0.87, method="srigl", total_steps=10, dense_stem_and_head=False)
    assert not dst_prune.is_sparse(model)


def test_masks_without_constant_fan_in_are_refused_at_the_update_naming_the_layer():
    model = nn.Linear(6, 4, bias=False)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    dst = dst_prune.load_sparse_state_dict(model, {"weight_orig": torch.randn(4, 6) * mask, "weight_mask": mask},
                                           method="srigl", total_steps=10)
    dst.capture_dense_gradients()
    model(torch.randn(2, 6)).sum().backward()
    before = snapshot(model)
    with pytest.raises(dst_prune.DSTError, match=r"weight has 1 to 3 active weights per active neuron"):
        dst.reparameterize()
    assert_unchanged(model, before)
