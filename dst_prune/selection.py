"""Choosing positions: exact top-k with ties broken by index, and seeded uniform draws.

Both return a bool tensor of the input's shape with exactly the requested number of True entries, in
O(n) (a selection, not a sort), and depend only on their inputs and the generator, so every rank
computes the same result.
"""

from __future__ import annotations

import torch

__all__ = ["random_positions", "top_k_mask"]


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` largest entries of `scores`; among equal scores the lower flat (row-major) index wins."""
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full(scores.shape, k >= n and n > 0, dtype=torch.bool, device=scores.device)
    kth = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    chosen = flat > kth
    equal = flat == kth
    chosen |= equal & (equal.cumsum(0) <= k - int(chosen.sum()))
    return chosen.view(scores.shape)


def random_positions(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` positions drawn uniformly without replacement among the True entries of `candidates`."""
    flat = candidates.reshape(-1)
    if not count:
        return torch.zeros(candidates.shape, dtype=torch.bool, device=candidates.device)
    scores = torch.rand(flat.numel(), generator=generator, device=flat.device)
    scores.masked_fill_(~flat, -1.0)
    return top_k_mask(scores, count).view(candidates.shape)
