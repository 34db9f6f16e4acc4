"""The fast paths compute exactly what the general ones do: selections, candidates, the masking kernel, the cached
counts and ever-active bits of an update, the thread policy, and the weights a compiled forward reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dst_prune
from dst_prune import _selection as sel
from dst_prune._masking.masked_weight import masked_copy, zero_outside
from dst_prune._scores import all_finite
from dst_prune.algorithms import RigL
from dst_prune.algorithms.fan_in import top_k_per_row
from dst_prune.groups import top_k_per_block


def scores_with_ties(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (n,), generator=g).float() if seed % 2 else torch.randn(n, generator=g)


@pytest.mark.parametrize("n", [1000, 100_000, 300_000])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_among_candidates_equals_top_k_of_the_masked_scores(n, seed):
    g = torch.Generator().manual_seed(seed + 10)
    scores, mask = scores_with_ties(n, seed), torch.rand(n, generator=g) < 0.1
    also = mask.nonzero().view(-1)[torch.randperm(int(mask.sum()), generator=g)[:n // 50]]
    full = (~mask).index_fill(0, also, True)
    for k in [0, 1, n // 100, n // 20, n // 4]:
        expected = sel.top_k_indices(torch.where(full, scores, float("-inf")), k)
        got = sel.top_k_outside(scores, k, sel.Outside(mask, also=also))
        assert torch.equal(got, expected[full[expected]]), k


@pytest.mark.parametrize("n", [5000, 400_000])
def test_random_draws_among_candidates_equal_those_among_the_bool_tensor(n):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(n, generator=g) < 0.1
    active = mask.nonzero().view(-1)
    also, exclude = active[::7], (~mask).nonzero().view(-1)[::5]
    full = (~mask).index_fill(0, exclude, False).index_fill(0, also, True)
    outside = sel.Outside(mask, also=also, exclude=(exclude, None))
    flagged = sel.Outside(mask, also=also, exclude=(exclude, sel.index_mask(exclude, (n,), mask.device)))
    assert outside.count == flagged.count == int(full.sum())
    for count in [0, 10, n // 50, n // 3]:
        expected = sel.random_indices(full, count, torch.Generator().manual_seed(count))
        assert torch.equal(sel.random_indices(outside, count, torch.Generator().manual_seed(count)), expected)
        assert torch.equal(sel.random_indices(flagged, count, torch.Generator().manual_seed(count)), expected)
    probe = torch.randint(n, (1000,), generator=g)
    assert torch.equal(outside.at(probe), full[probe]) and torch.equal(outside.full(), full)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.03, 0.2])
def test_nonzero_indices_and_contains(density):
    g = torch.Generator().manual_seed(4)
    flags = torch.rand(1 << 17, generator=g) < density
    assert torch.equal(sel.nonzero_indices(flags), flags.nonzero().view(-1))
    assert torch.equal(sel.nonzero_indices(flags[8:]), flags[8:].nonzero().view(-1))  # (an offset view)
    values = torch.randint(1 << 17, (500,), generator=g)
    found = flags.nonzero().view(-1)
    assert torch.equal(sel.contains(found, values), torch.isin(values, found))
    assert torch.equal(sel.ascending(values), values.sort().values)


@pytest.mark.parametrize("seed", range(6))
def test_top_k_per_row_equals_a_stable_sort_of_every_row(seed):
    g = torch.Generator().manual_seed(seed)
    rows, columns = [(30, 17), (64, 300), (8, 2048)][seed % 3]
    scores = torch.randint(0, 6, (rows, columns), generator=g).float() if seed % 2 else \
        torch.randn(rows, columns, generator=g)
    scores[torch.rand(rows, columns, generator=g) < 0.3] = float("-inf")
    counts = torch.randint(0, max(2, columns // (1 + seed)), (rows,), generator=g)
    assert torch.equal(top_k_per_row(scores, counts), top_k_per_block(scores, counts))


def test_all_finite_sees_every_kind_of_non_finite_value():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        tensor = torch.randn(1000).to(dtype)
        assert all_finite(tensor)
        for bad in (float("nan"), float("inf"), -float("inf")):
            broken = tensor.clone()
            broken[517] = bad
            assert not all_finite(broken), (dtype, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(100,), (300, 784), (128, 64, 3, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_bit_product_is_bit_for_bit_torch_where(dtype, shape, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is for 4-d weights")
    g = torch.Generator().manual_seed(5)
    tensor, mask = torch.randn(shape, generator=g).to(dtype), torch.rand(shape, generator=g) < 0.3
    tensor.view(-1)[:40] = float("nan")
    tensor.view(-1)[40:80] = float("inf")
    tensor.view(-1)[80:120] = -0.0
    if channels_last:
        tensor, mask = tensor.to(memory_format=torch.channels_last), mask.to(memory_format=torch.channels_last)
    expected = torch.where(mask, tensor, torch.zeros((), dtype=dtype))
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    copy = masked_copy(tensor, mask)
    assert copy.stride() == tensor.stride()
    assert torch.equal(copy.contiguous().view(bits), expected.contiguous().view(bits))
    assert torch.equal(zero_outside(tensor, mask).contiguous().view(bits), expected.contiguous().view(bits))


def sparse_mlp(method: str = "rigl", **kwargs) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.9, method=method, optimizer=optimizer, update_every=2, total_steps=1000,
                          dense_stem_and_head=False, **kwargs)
    return model, optimizer, dst


def train(model, optimizer, dst, steps: int) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 64, generator=g)), torch.randint(0, 10, (16,),
                                                                                          generator=g)).backward()
        optimizer.step()
        dst.step()


def test_a_mask_written_between_updates_is_counted_again():
    model, optimizer, dst = sparse_mlp("set")
    train(model, optimizer, dst, 4)
    mask = model[2].weight_mask
    inactive, active = (~mask).nonzero()[0].tolist(), mask.nonzero()[0].tolist()
    with torch.no_grad():  # the same count, another position (strong: kept): the ever-active bits must see it
        mask[tuple(inactive)], mask[tuple(active)] = True, False
        model[2].weight_orig[tuple(inactive)] = 10.0
    dst.reparameterize()
    position = inactive[0] * 512 + inactive[1]
    layer = next(i for i, t in enumerate(dst.targets) if t.name == "2.weight")
    assert dst_prune._bits.unpack_bits(dst.ever_active[layer], mask.shape).view(-1)[position]
    with torch.no_grad():  # one more: refused before anything changes
        mask[tuple((~mask).nonzero()[0].tolist())] = True
    with pytest.raises(dst_prune.DSTError, match="masks hold"):
        dst.reparameterize()


def test_ever_active_bits_and_counts_equal_a_full_recount_after_updates():
    model, optimizer, dst = sparse_mlp("set")
    train(model, optimizer, dst, 12)
    packed = [dst_prune._bits.pack_bits(t.mask) for t in dst.targets]
    assert all(bool(((e & p) == p).all()) for e, p in zip(dst.ever_active, packed))  # every active bit is set
    recount = sum(dst_prune._bits.count_bits(e) for e in dst.ever_active) / dst.n_sparse
    assert dst.history[-1]["itop"] == recount and sum(dst.history[-1]["active"]) == dst.budget


def test_an_update_runs_on_one_thread_and_restores_the_setting():
    seen = []

    class Recording(RigL):
        def exchange(self, fraction):
            seen.append(torch.get_num_threads())
            super().exchange(fraction)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = dst_prune.apply(model, sparsity=0.9, method=Recording(), optimizer=optimizer, update_every=1,
                          total_steps=100, dense_stem_and_head=False)
    torch.set_num_threads(2)
    try:
        model(torch.randn(4, 64)).sum().backward()
        optimizer.step()
        assert dst.step()
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


class Scribbler(torch.optim.SGD):
    """An optimizer that also writes where the weights are masked (what masking by construction guards against)."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                param.add_(0.5)


def test_step_leaves_the_weights_zero_outside_the_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = Scribbler(model.parameters(), lr=0.1)
    dst = dst_prune.apply(model, sparsity=0.8, optimizer=optimizer, method="static", dense_stem_and_head=False)
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    dst.step()
    for target in dst.targets:
        assert not target.orig.detach()[~target.mask].any()


def test_a_compiled_forward_reads_weights_that_step_masked():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = Scribbler(model.parameters(), lr=0.1)
    dst = dst_prune.apply(model, sparsity=0.8, optimizer=optimizer, update_every=2, dense_stem_and_head=False)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 32)
    for _ in range(4):
        out = compiled(x)
        with torch.no_grad():
            torch.testing.assert_close(out, model(x))
        out.sum().backward()
        assert all(not t.orig.grad[~t.mask].any() for t in dst.targets)  # the gradient is masked in the graph
        optimizer.step()
        optimizer.zero_grad()
        dst.step()
