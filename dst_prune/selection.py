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


_SAMPLE = 1 << 16  # sample size of the threshold estimate in `kth_largest`


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The `k`-th largest value of the 1-D `flat` (`1 <= k <= n`), exactly.

    For a large `n` and a small `k`, a strided sample first gives a value `t` that at least `k` entries
    reach with high probability; the exact selection then runs on the entries `>= t` only (which hold
    the top `k` whenever there are at least `k` of them), else on everything.
    """
    n = flat.numel()
    if n > 4 * _SAMPLE and k < n // 8:
        sample = flat[:: n // _SAMPLE]
        rank = min(sample.numel(), 2 * k * sample.numel() // n + 64)
        estimate = torch.kthvalue(sample, sample.numel() - rank + 1).values
        superset = flat[flat >= estimate]
        if superset.numel() >= k:
            return torch.kthvalue(superset, superset.numel() - k + 1).values
    return torch.kthvalue(flat, n - k + 1).values


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` largest entries of `scores`; among equal scores the lower flat (row-major) index wins."""
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full(scores.shape, k >= n and n > 0, dtype=torch.bool, device=scores.device)
    kth = kth_largest(flat, k)
    chosen = flat > kth
    missing = k - int(torch.count_nonzero(chosen))
    if missing:
        chosen[(flat == kth).nonzero().view(-1)[:missing]] = True
    return chosen.view(scores.shape)


def _first_distinct(values: torch.Tensor, limit: int) -> torch.Tensor:
    """The first `limit` distinct entries of `values`, in order of first appearance."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.numel(), device=values.device)
    first = torch.full_like(unique, values.numel()).scatter_reduce_(0, inverse, positions, reduce="amin")
    return unique[first.argsort()][:limit]


def random_positions(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` positions drawn uniformly without replacement among the True entries of `candidates`.

    Costs O(count) when candidates are common (uniform draws over all positions, rejecting the others,
    until `count` distinct ones), else O(n) (a random permutation of the candidates).
    """
    flat = candidates.reshape(-1)
    n, device = flat.numel(), flat.device
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    if not count:
        return chosen.view(candidates.shape)
    total = int(torch.count_nonzero(flat))
    if count > total:
        raise ValueError(f"cannot draw {count} positions among {total} candidates")
    if 4 * count > total or 4 * total < n:
        indices = flat.nonzero().view(-1)
        picked = indices[torch.randperm(total, generator=generator, device=device)[:count]]
    else:
        picked = torch.empty(0, dtype=torch.long, device=device)
        while picked.numel() < count:
            draws = torch.randint(n, ((count - picked.numel()) * n // total * 5 // 4 + 16,), generator=generator,
                                  device=device)
            picked = _first_distinct(torch.cat([picked, draws[flat[draws]]]), count)
    chosen[picked] = True
    return chosen.view(candidates.shape)


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
