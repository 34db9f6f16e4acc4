"""Exact non-zero counts for every distribution, and the apportionment they rest on."""

from __future__ import annotations

import math
import random

import pytest

from dst_prune.budget.distributions import LAYERWISE, apportion, layer_budgets, total_budget


def test_apportion_largest_remainder_ties_to_lower_index():
    assert apportion(4, [1, 1, 1], [3, 3, 3]) == [2, 1, 1]
    assert apportion(5, [1, 1, 1], [3, 3, 3]) == [2, 2, 1]
    # 7 * (0.5, 0.3, 0.2) = 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the one left goes to the largest remainder
    assert apportion(7, [5, 3, 2], [10, 10, 10]) == [4, 2, 1]


def test_apportion_caps_and_hands_excess_to_the_others():
    # 10 split 8:1:1 would give 8 to the first, but it holds 2; the other 8 go 4:4
    assert apportion(10, [8, 1, 1], [2, 10, 10]) == [2, 4, 4]


def test_apportion_zero_shares_only_take_what_the_others_cannot_hold():
    assert apportion(3, [1, 0], [5, 5]) == [3, 0]
    assert apportion(7, [1, 0], [5, 5]) == [5, 2]


def test_apportion_refuses_impossible_totals():
    with pytest.raises(ValueError):
        apportion(11, [1, 1], [5, 5])


def test_apportion_random_cases_are_exact():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 12)
        caps = [rng.randint(0, 50) for _ in range(n)]
        shares = [rng.choice([0.0, rng.random(), rng.randint(1, 1000)]) for _ in range(n)]
        total = rng.randint(0, sum(caps))
        counts = apportion(total, shares, caps)
        assert sum(counts) == total
        assert all(0 <= c <= cap for c, cap in zip(counts, caps))


def test_erk_hand_computed_with_a_capped_layer():
    # ERK weights sum(shape)/prod(shape): (4,2) -> 6/8, (10,10) -> 20/100, (20,20) -> 40/400.
    # Non-zeros are proportional to weight * size = 6 : 20 : 40. At sparsity 0.5 the budget is 254:
    # the first layer's share 6/66 * 254 = 23.1 exceeds its 8 weights, so it is dense and the other
    # 246 split 20:40 = 82 and 164.
    assert layer_budgets([(4, 2), (10, 10), (20, 20)], 0.5, "erk") == [8, 82, 164]


def test_er_uses_the_two_channel_dims_and_erk_the_kernel_too():
    shapes = [(8, 4, 3, 3), (16, 8, 3, 3)]
    # ER: (8+4)/32 * 288 = 108 and (16+8)/128 * 1152 = 216, ratio 1:2; budget 0.25 * 1440 = 360
    assert layer_budgets(shapes, 0.75, "er") == [120, 240]
    # ERK: (8+4+3+3)/288 * 288 = 18 and (16+8+3+3)/1152 * 1152 = 30, ratio 18:30
    assert layer_budgets(shapes, 0.75, "erk") == [135, 225]


@pytest.mark.parametrize("distribution", LAYERWISE)
def test_every_distribution_hits_the_budget_exactly(distribution):
    rng = random.Random(1)
    for _ in range(200):
        shapes = [tuple(rng.randint(1, 64) for _ in range(rng.choice([1, 2, 4]))) for _ in range(rng.randint(1, 8))]
        sparsity = rng.choice([0.0, 0.5, 0.9, 0.95, 0.99, rng.random() * 0.999])
        counts = layer_budgets(shapes, sparsity, distribution)
        n = sum(math.prod(s) for s in shapes)
        assert sum(counts) == total_budget(sparsity, n) == round((1 - sparsity) * n)
        assert all(0 <= c <= math.prod(s) for c, s in zip(counts, shapes))


def test_uniform_gives_every_layer_the_same_density():
    counts = layer_budgets([(100, 10), (30, 10), (50, 4, 3, 3)], 0.9, "uniform")
    assert counts == [100, 30, 180]
