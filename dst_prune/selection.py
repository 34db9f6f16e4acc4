"""Choosing positions: exact top-k with ties broken by index, seeded uniform draws, derived seeds.

Both return a bool tensor of the input's shape with exactly the requested number of True entries, in
O(n) (a selection, not a sort), and depend only on their inputs and the generator, so every rank
computes the same result.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["GROWTH_STREAM", "INIT_STREAM", "derive_seed", "global_top_k", "random_positions", "top_k_mask"]

GROWTH_STREAM, INIT_STREAM = 0, 1


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


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


def global_top_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The `k` largest entries across all tensors, with at least one (its largest) in each tensor.

    Ties break by position in the concatenation (tensor order, then row-major index). Requires
    `len(scores) <= k`; entries at `-inf` are chosen only if fewer than `k` others exist.
    """
    forced = [top_k_mask(s, 1) for s in scores]
    device = scores[0].device
    rest = torch.cat([s.detach().reshape(-1).to(device).float().masked_fill(f.reshape(-1).to(device), float("-inf"))
                      for s, f in zip(scores, forced)])
    chosen = top_k_mask(rest, k - len(scores)).split([s.numel() for s in scores])
    return [f | c.view(s.shape).to(s.device) for s, f, c in zip(scores, forced, chosen)]
