"""Exact top-k with index tie-breaking, and seeded uniform draws."""

from __future__ import annotations

import pytest
import torch

from dst_prune._selection import random_indices, random_positions, top_k_indices, top_k_mask


def test_top_k_breaks_ties_by_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.5], [0.1, 0.5, 0.9]])
    assert top_k_mask(scores, 3).tolist() == [[True, True, False], [False, False, True]]
    assert top_k_mask(scores, 4).tolist() == [[True, True, True], [False, False, True]]
    assert top_k_mask(torch.zeros(5), 2).tolist() == [True, True, False, False, False]
    assert top_k_mask(scores, 0).sum() == 0 and top_k_mask(scores, 6).all()


def test_top_k_matches_a_stable_sort_on_random_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        scores = torch.randint(0, 5, (37,), generator=g).float()
        k = int(torch.randint(0, 38, (1,), generator=g))
        expected = torch.zeros(37, dtype=torch.bool)
        expected[torch.argsort(scores, descending=True, stable=True)[:k]] = True
        assert torch.equal(top_k_mask(scores, k), expected)


def test_top_k_of_a_channels_last_tensor_uses_logical_order():
    scores = torch.randn(2, 3, 4, 4)
    assert torch.equal(top_k_mask(scores.to(memory_format=torch.channels_last), 7), top_k_mask(scores, 7))


def test_random_positions_are_exact_among_candidates_and_seeded():
    candidates = torch.rand(10, 10, generator=torch.Generator().manual_seed(1)) > 0.5
    draws = [random_positions(candidates, 12, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    for chosen in draws:
        assert int(chosen.sum()) == 12 and not (chosen & ~candidates).any()
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    every = random_positions(candidates, int(candidates.sum()), torch.Generator().manual_seed(0))
    assert torch.equal(every, candidates)


@pytest.mark.parametrize("k", [1, 37, 3_000, 30_000, 150_000])
def test_top_k_on_large_tensors_with_ties_and_minus_infinity_is_exact(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 1000, (300_000,), generator=g).float()  # many ties
    scores[torch.rand(300_000, generator=g) < 0.5] = float("-inf")  # inactive entries, as the algorithms mask them
    expected = torch.zeros(300_000, dtype=torch.bool)
    expected[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    assert torch.equal(top_k_mask(scores, k), expected)


@pytest.mark.parametrize(("density", "count"), [(0.9, 500), (0.9, 60_000), (0.1, 50), (0.5, 1)])
def test_random_indices_are_distinct_candidates_and_uniform(density, count):
    g = torch.Generator().manual_seed(0)
    candidates = torch.rand(100_000, generator=g) < density
    picked = random_indices(candidates, count, torch.Generator().manual_seed(1))
    assert picked.numel() == count == picked.unique().numel()
    assert candidates[picked].all()
    again = random_indices(candidates, count, torch.Generator().manual_seed(1))
    assert torch.equal(picked, again)


def test_random_indices_cover_candidates_uniformly():
    candidates = torch.ones(1000, dtype=torch.bool)
    candidates[::10] = False
    hits = torch.zeros(1000)
    for seed in range(400):
        hits[random_indices(candidates, 50, torch.Generator().manual_seed(seed))] += 1
    assert hits[~candidates].sum() == 0
    rates = hits[candidates] / 400  # expected 50/900 each
    assert abs(float(rates.mean()) - 50 / 900) < 1e-9 and float(rates.std()) < 0.02


@pytest.mark.parametrize("k", [10, 2_000, 40_000])
def test_top_k_of_a_column_structured_gradient_is_exact(k):
    """A Linear's gradient `g x^T` scales whole columns: the threshold sample must not see only a few."""
    g = torch.Generator().manual_seed(k)
    grad = torch.outer(torch.randn(256, generator=g), torch.randn(2048, generator=g) ** 3).abs()
    expected = torch.zeros(grad.numel(), dtype=torch.bool)
    expected[torch.argsort(grad.flatten(), descending=True, stable=True)[:k]] = True
    assert torch.equal(top_k_mask(grad, k).flatten(), expected)


@pytest.mark.parametrize("k", [0, 1, 37, 3_000, 30_000, 150_000, 300_000])
def test_top_k_indices_are_the_ascending_positions_of_top_k_mask(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 1000, (600, 500), generator=g).float()  # ties at the k-th value, sampled path and not
    scores[torch.rand(600, 500, generator=g) < 0.3] = float("-inf")
    indices = top_k_indices(scores, k)
    assert torch.equal(indices, top_k_mask(scores, k).reshape(-1).nonzero().view(-1))
