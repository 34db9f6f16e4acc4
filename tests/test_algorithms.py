"""Each algorithm on small tensors with hand-computed masks, plus invariants and determinism for all of them."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import SmallCNN, assert_invariants, small_cnn_batch
from torch import nn

import dst_prune
from dst_prune.budget.distributions import apportion, total_budget
from dst_prune.schedules import cubic_sparsity

DYNAMIC = ["set", "dsr", "rigl", "srigl", "snfs", "granet"]


def linear_with(weight, mask, **kwargs):
    """A bias-free Linear whose weight and mask are given, with a controller for `kwargs`."""
    weight, mask = torch.tensor(weight), torch.tensor(mask)
    model = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    dst = dst_prune.load_sparse_state_dict(model, {"weight_orig": weight * mask, "weight_mask": mask}, **kwargs)
    return model, dst


def backward_with_gradient(model, gradient):
    """One backward pass whose dL/dW is exactly `gradient` (out[i, j] = W[j, i] for x = I)."""
    out = model(torch.eye(model.in_features))
    (out * gradient.T).sum().backward()


def test_static_never_changes_the_mask():
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = dst_prune.apply(model, sparsity=0.9, method="static", update_every=1)
    masks = [t.mask.clone() for t in dst.targets]
    x, y = small_cnn_batch()
    for _ in range(5):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        assert not dst.step()
    assert all(torch.equal(m, t.mask) for m, t in zip(masks, dst.targets)) and dst.history == []


def test_set_drops_exactly_the_smallest_magnitudes_and_regrows_at_random():
    weight = [[0.5, -0.1, 0.3, 0.05], [-0.4, 0.2, 0.0, 0.0]]
    mask = [[True] * 4, [True, True, False, False]]
    for seed in range(5):
        model, dst = linear_with(weight, mask, method="set", drop_fraction=0.5, seed=seed)
        dst.reparameterize()  # drops int(0.5 * 6) = 3: |0.05|, |-0.1|, |0.2| (flat 3, 1, 5)
        final = model.weight_mask.reshape(-1)
        assert final[[0, 2, 4]].all() and int(final.sum()) == 6
        record = dst.history[-1]
        assert record["pruned"] == record["grown"] == [int((~final[[1, 3, 5]]).sum())]
        values = model.weight_orig.detach().reshape(-1)
        for position in range(8):
            if position in (1, 3, 5) and final[position]:
                assert values[position] == torch.tensor(weight).reshape(-1)[position]  # dropped and regrown: kept
            elif position in (6, 7) or not final[position]:
                assert values[position] == 0
    draws = set()
    for seed in range(8):
        model, dst = linear_with(weight, mask, method="set", drop_fraction=0.5, seed=seed)
        dst.reparameterize()
        draws.add(tuple(model.weight_mask.reshape(-1).tolist()))
    assert len(draws) > 1


def test_rigl_grows_exactly_at_the_largest_gradient_positions():
    weight = [[0.5, -0.1, 0.0], [0.0, 0.3, 0.05]]
    mask = [[True, True, False], [False, True, True]]
    model, dst = linear_with(weight, mask, method="rigl", drop_fraction=0.5, decay="constant", total_steps=1000)
    dst.capture_dense_gradients()
    backward_with_gradient(model, torch.tensor([[0.0, 0.9, 0.2], [0.7, 0.0, 0.2]]))
    dst.reparameterize()
    # drop int(0.5 * 4) = 2: -0.1 (flat 1) and 0.05 (flat 5); candidates {1, 2, 3, 5} with |g| 0.9, 0.2,
    # 0.7, 0.2: grow flat 1 and 3. Flat 1 was dropped and regrown, so it keeps its weight.
    assert model.weight_mask.tolist() == [[True, True, False], [True, True, False]]
    assert torch.equal(model.weight_orig.detach(), torch.tensor([[0.5, -0.1, 0.0], [0.0, 0.3, 0.0]]))
    assert dst.history[-1]["pruned"] == [1] and dst.history[-1]["grown"] == [1]


def test_rigl_gradient_ties_go_to_the_lower_index():
    weight = [[0.5, -0.1, 0.0], [0.0, 0.3, 0.05]]
    mask = [[True, True, False], [False, True, True]]
    model, dst = linear_with(weight, mask, method="rigl", drop_fraction=0.25, decay="constant", total_steps=1000)
    dst.capture_dense_gradients()
    backward_with_gradient(model, torch.tensor([[0.0, 0.0, 0.7], [0.7, 0.0, 0.1]]))
    dst.reparameterize()  # drops flat 5 (0.05); flat 2 and 3 tie at 0.7: flat 2 wins
    assert model.weight_mask.tolist() == [[True, True, True], [False, True, False]]


def test_rigl_without_a_captured_gradient_says_how_to_get_one():
    _, dst = linear_with([[0.5, 0.1]], [[True, False]], method="rigl", total_steps=10)
    with pytest.raises(dst_prune.DSTError, match=re.escape("Call dst.step() after every optimizer step, or "
                                                           "dst.capture_dense_gradients()")):
        dst.reparameterize()


def test_snfs_momentum_accumulates_the_dense_gradient():
    model, dst = linear_with([[0.5, 0.0], [0.0, 0.3]], [[True, False], [False, True]], method="snfs",
                             momentum=0.5, total_steps=100, update_every=50)
    first, second = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    for gradient in (first, second):
        backward_with_gradient(model, gradient)
        model.zero_grad()
        dst.step()
    assert torch.allclose(dst.algorithm.gradient_momentum[0], 0.5 * first + second)  # dense: masked positions too


def test_snfs_shares_follow_the_mean_momentum_of_active_weights():
    size = 4
    model = nn.Sequential(nn.Linear(size, size, bias=False), nn.Linear(size, size, bias=False))
    state = {}
    for i in range(2):
        weight = torch.zeros(16)
        weight[:8] = torch.arange(1, 9) / 10  # 8 active; the 4 weakest (flat 0-3) are dropped at rate 0.5
        state[f"{i}.weight_orig"], state[f"{i}.weight_mask"] = weight.view(4, 4), (weight != 0).view(4, 4)
    dst = dst_prune.load_sparse_state_dict(model, state, method="snfs", drop_fraction=0.5, decay="constant",
                                           total_steps=100)
    momentum = [torch.zeros(16), torch.zeros(16)]
    momentum[0][:8], momentum[1][:8] = 3.0, 1.0  # mean |M| over active weights: 3 and 1
    momentum[0][8:] = torch.tensor([10.0, 9, 8, 7, 6, 5, 4, 3.5])
    momentum[1][8:] = torch.tensor([2.0, 1.5, 1.2, 1.1, 0.5, 0.4, 0.3, 0.2])
    dst.algorithm.gradient_momentum = [m.view(4, 4) for m in momentum]
    dst.reparameterize()
    # 8 dropped in all, shared 3:1 -> 6 and 2, grown at the largest momentum among inactive positions
    assert apportion(8, [3.0, 1.0], [12, 12]) == [6, 2]
    assert dst.history[-1]["grown"] == [6, 2] and dst.history[-1]["pruned"] == [4, 4]
    assert model[0].weight_mask.reshape(-1).tolist() == [False] * 4 + [True] * 10 + [False] * 2
    assert model[1].weight_mask.reshape(-1).tolist() == [False] * 4 + [True] * 6 + [False] * 6


def test_gmp_follows_the_cubic_schedule_and_never_regrows():
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = dst_prune.apply(model, sparsity=0.9, method="gmp", total_steps=40, update_every=5, optimizer=optimizer)
    assert dst.budget == dst.n_sparse  # starts dense
    x, y = small_cnn_batch()
    previous = [t.mask.clone() for t in dst.targets]
    for _ in range(40):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if dst.step():
            expected = total_budget(cubic_sparsity(dst.step_count, 0, 30, 0.0, 0.9), dst.n_sparse)
            assert sum(dst.history[-1]["active"]) == expected == dst.budget
            assert all(not (t.mask & ~p).any() for t, p in zip(dst.targets, previous))  # only prunes
            previous = [t.mask.clone() for t in dst.targets]
            assert_invariants(dst, optimizer)
    assert [r["step"] for r in dst.history] == [5, 10, 15, 20, 25, 30]
    assert dst.budget == round(0.1 * dst.n_sparse)


def test_global_distribution_keeps_the_largest_weights_of_the_model():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.9, 0.1], [0.2, 0.3]]))
        model[1].weight.copy_(torch.tensor([[0.05, 0.04], [0.5, 0.01]]))
    # 3 of 8 kept: 0.9, 0.5 and 0.3 (layer 1 keeps its largest, which is also in the global top 3)
    one_shot = dst_prune.apply(model, sparsity=0.625, method="static", distribution="global",
                               dense_stem_and_head=False)
    assert model[0].weight_mask.tolist() == [[True, False], [False, True]]
    assert model[1].weight_mask.tolist() == [[False, False], [True, False]]
    assert one_shot.budget == 3


def test_global_distribution_never_empties_a_layer():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(0.001)
    dst_prune.apply(model, sparsity=0.75, method="static", distribution="global", dense_stem_and_head=False)
    assert int(model[0].weight_mask.sum()) == 1 and int(model[1].weight_mask.sum()) == 1


def test_gmp_global_prunes_the_smallest_weights_across_layers():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.9, 0.1], [0.2, 0.3]]))
        model[1].weight.copy_(torch.tensor([[0.05, 0.04], [0.5, 0.01]]))
    dst = dst_prune.apply(model, sparsity=0.625, method="gmp", distribution="global", stop_step=1,
                          dense_stem_and_head=False)
    assert dst.budget == 8
    assert dst.step()
    assert model[0].weight_mask.tolist() == [[True, False], [False, True]]
    assert model[1].weight_mask.tolist() == [[False, False], [True, False]]


def test_granet_prunes_on_schedule_and_regenerates():
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.9, method="granet", initial_sparsity=0.5, total_steps=40,
                          update_every=5, optimizer=optimizer)
    assert dst.budget == round(0.5 * dst.n_sparse)
    x, y = small_cnn_batch()
    for _ in range(40):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if dst.step():
            expected = total_budget(cubic_sparsity(dst.step_count, 0, 30, 0.5, 0.9), dst.n_sparse)
            assert sum(dst.history[-1]["active"]) == expected
            assert_invariants(dst, optimizer)
    assert sum(sum(r["grown"]) for r in dst.history) > 0
    assert dst.budget == round(0.1 * dst.n_sparse)


@pytest.mark.parametrize("method", dst_prune.list_methods())
def test_every_method_keeps_the_invariants_and_is_deterministic(method):
    def run(seed):
        torch.manual_seed(0)
        model = SmallCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        extra = {"pruning_threshold": 0.05} if method == "dsr" else {}
        dst = dst_prune.apply(model, sparsity=0.8, method=method, optimizer=optimizer, update_every=2,
                              total_steps=16, seed=seed, init="random", **extra)
        x, y = small_cnn_batch()
        for _ in range(16):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            dst.step()
            assert_invariants(dst, optimizer)
        return [t.mask.clone() for t in dst.targets], dst

    masks, dst = run(0)
    again, _ = run(0)
    assert all(torch.equal(a, b) for a, b in zip(masks, again))
    assert dst.budget == round(0.2 * dst.n_sparse)
    if method in DYNAMIC:
        assert sum(sum(r["grown"]) for r in dst.history) > 0
    if method in DYNAMIC and method != "granet":  # GraNet starts dense and grows by gradient: no randomness
        other, _ = run(1)
        assert not all(torch.equal(a, b) for a, b in zip(masks, other))


def test_itop_and_churn_are_measured_from_the_masks(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = dst_prune.apply(model, sparsity=0.8, method="set", optimizer=optimizer, update_every=1)
    ever = [t.mask.clone() for t in dst.targets]
    x, y = small_cnn_batch()
    for _ in range(4):
        before = [t.mask.clone() for t in dst.targets]
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        dst.step()
        new = sum(int((t.mask & ~b).sum()) for t, b in zip(dst.targets, before))
        ever = [e | t.mask for e, t in zip(ever, dst.targets)]
        record = dst.history[-1]
        assert record["churn"] == new / dst.budget
        assert record["itop"] == sum(int(e.sum()) for e in ever) / dst.n_sparse
    assert [r["itop"] for r in dst.history] == sorted(r["itop"] for r in dst.history)
    csv_path = dst.save_history(tmp_path / "history.csv")
    header, *rows = open(csv_path).read().splitlines()
    assert len(rows) == 4 and "itop" in header and "density/conv.weight" in header
    png = dst.plot_history(tmp_path / "history.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_rigl_gives_an_unused_tensor_a_zero_gradient():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = TwoBranches()
    dst = dst_prune.apply(model, sparsity=0.5, method="rigl", total_steps=10, update_every=1,
                          dense_stem_and_head=False)
    model(torch.randn(2, 4)).sum().backward()
    assert dst.step()  # no error although no gradient reached `unused`
    assert sum(dst.history[-1]["active"]) == dst.budget and dst.history[-1]["grown"][0] > 0


def test_a_skipped_optimizer_step_is_not_counted_and_its_gradient_discarded():
    model, dst = linear_with([[0.5, 0.0], [0.0, 0.3]], [[True, False], [False, True]], method="rigl",
                             total_steps=100, update_every=2)
    dst.step()  # step 1; step 2 is an update step, so its dense gradient is captured
    backward_with_gradient(model, torch.full((2, 2), float("inf")))  # an fp16 overflow
    assert not dst.step(skipped=True)
    assert dst.step_count == 1 and all(s.value is None for s in dst.dense_gradient_sinks)
    backward_with_gradient(model, torch.tensor([[0.0, 0.9], [0.1, 0.0]]))
    assert dst.step() and dst.step_count == 2
    assert torch.isfinite(model.weight_orig).all()
