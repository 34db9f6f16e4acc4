"""The invariants of docs/design.md after every update, for several models and optimizers, reallocating every step."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import AttentionNet, CharLSTM, SmallCNN, assert_invariants, small_cnn_batch
from torch import nn

import dst_prune

MODELS = {
    "cnn": (SmallCNN, lambda: small_cnn_batch()),
    "lstm": (CharLSTM, lambda: (torch.randint(0, 20, (4, 6)), None)),
    "attention": (AttentionNet, lambda: (torch.randn(4, 5, 8), torch.randint(0, 4, (4,)))),
}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}


def loss_of(model, x, y):
    out = model(x)
    if y is None:  # language model: predict the tokens themselves
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1))
    return nn.functional.cross_entropy(out, y)


METHODS = {"dsr": {"pruning_threshold": 0.02}, "set": {}, "rigl": {"total_steps": 100},
           "srigl": {"total_steps": 100},
           "snfs": {"total_steps": 100}}


DISTRIBUTIONS = ["uniform", "erk", "global"]


def pairwise(*factors: list) -> set[tuple]:
    """A small set of combinations that holds every pair of values of every two factors (greedy covering)."""
    grid = list(itertools.product(*factors))
    missing = {(i, a, j, b) for i, j in itertools.combinations(range(len(factors)), 2)
               for a in factors[i] for b in factors[j]}
    chosen = set()
    while missing:
        best = max(grid, key=lambda c: sum((i, c[i], j, c[j]) in missing
                                           for i, j in itertools.combinations(range(len(c)), 2)))
        chosen.add(best)
        missing -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(best)), 2)}
    return chosen


FACTORS = [list(MODELS), list(OPTIMIZERS), DISTRIBUTIONS, list(METHODS)]
PAIRWISE = pairwise(*FACTORS)
GRID = [pytest.param(*case, marks=() if case in PAIRWISE else pytest.mark.slow) for case in itertools.product(*FACTORS)]


def test_the_fast_set_covers_every_pair():
    for i, j in itertools.combinations(range(len(FACTORS)), 2):
        assert {(c[i], c[j]) for c in PAIRWISE} == set(itertools.product(FACTORS[i], FACTORS[j]))
    assert len(PAIRWISE) < len(GRID) // 4


@pytest.mark.parametrize(("model_name", "optimizer_name", "distribution", "method"), GRID)
def test_invariants_after_every_update(model_name, optimizer_name, distribution, method):
    torch.manual_seed(0)
    factory, batch = MODELS[model_name]
    model = factory()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    dst = dst_prune.apply(model, sparsity=0.75, method=method, distribution=distribution, optimizer=optimizer,
                          update_every=1, dense_stem_and_head=False, **METHODS[method])
    assert dst.budget == round(0.25 * dst.n_sparse)
    x, y = batch()
    moved = 0
    for _ in range(6):
        before = [t.mask.clone() for t in dst.targets]
        loss = loss_of(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert dst.step()
        assert_invariants(dst, optimizer)
        for b, t in zip(before, dst.targets):
            grown = t.mask & ~b
            moved += int(grown.sum())
            assert not t.orig.detach()[grown].any(), f"{t.name}: regrown weight not zero"
            for state in optimizer.state[t.orig].values():
                if isinstance(state, torch.Tensor) and state.shape == t.orig.shape:
                    assert not state[grown].any(), f"{t.name}: regrown weight has optimizer state"
            assert t.active() >= 1
        assert dst.sparsity == 1 - dst.budget / dst.n_sparse
        assert str(dst.sum_table).count("0.7500") == 1
    assert moved > 0, "no weight was ever reallocated: the test would not catch anything"
    assert torch.isfinite(loss_of(model, x, y))
