"""Choosing positions: exact top-k with ties broken by index, seeded uniform draws, derived seeds.

Both return a bool tensor of the input's shape with exactly the requested number of True entries, in
O(n) (a selection, not a sort), and depend only on their inputs and the generator, so every rank
computes the same result.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["GROWTH_STREAM", "INIT_STREAM", "Outside", "ascending", "contains", "derive_seed", "global_top_k",
           "index_mask", "nonzero_indices", "random_indices", "random_positions", "top_k_indices", "top_k_mask",
           "top_k_outside"]

GROWTH_STREAM, INIT_STREAM = 0, 1


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def nonzero_indices(flags: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """The ascending flat indices of the True entries of the bool `flags` (`flags.reshape(-1).nonzero()`).

    For few True entries (under 1 in 16; `count` of them, if known, else counted: one cheap pass) the search
    runs over 8-byte words first and then within the words that hold one: `nonzero` over a bool tensor costs
    several times a count on a CPU, and 2-5x less work this way (a selection's superset, a threshold's hits).
    """
    flat = flags.reshape(-1)
    n = flat.numel()
    if n < 1 << 16 or n % 8 or flat.storage_offset() % 8 or flat.device.type != "cpu":
        return flat.nonzero().view(-1)
    count = int(torch.count_nonzero(flat)) if count is None else count
    if count * 16 > n:
        return flat.nonzero().view(-1)
    words = flat.view(torch.int64).nonzero().view(-1)
    within = flat.view(-1, 8).index_select(0, words).view(-1).nonzero().view(-1)
    return words.index_select(0, within >> 3) * 8 + (within & 7)


_SAMPLE = 1 << 14  # sample size of the threshold estimate in `top_k_superset`
_SAMPLE_SEED = 0x5EED  # the sample positions are fixed pseudo-random ones, the same on every rank


def _sample_positions(n: int, device: torch.device) -> torch.Tensor:
    """`_SAMPLE` pseudo-random positions in `[0, n)` that depend only on `n`.

    Not a strided slice: weights and gradients are structured along rows (a Linear's gradient is
    `g x^T`, each column scaled by one input), and a stride that divides the row length samples a
    handful of columns only, whose values need not resemble the whole.
    """
    generator = torch.Generator().manual_seed(_SAMPLE_SEED + n)
    return torch.randint(n, (_SAMPLE,), generator=generator).to(device)


def top_k_superset(flat: torch.Tensor, k: int) -> torch.Tensor | None:
    """Ascending indices of a subset of the 1-D `flat` that holds its `k` largest entries, or None.

    For a large `n` and a small `k`, a random sample gives a value `t` that at least `k` entries reach
    with high probability; the entries `>= t` then hold the top `k` (ties included) whenever there are
    at least `k` of them. None when `k` is too large for this to pay, or when the sample fell short.
    """
    n = flat.numel()
    if n <= 4 * _SAMPLE or k >= n // 8:
        return None
    sample = flat[_sample_positions(n, flat.device)]
    rank = min(_SAMPLE, 5 * k * _SAMPLE // (4 * n) + 64)  # 25% and 64 above the expected rank
    estimate = torch.kthvalue(sample, _SAMPLE - rank + 1).values
    superset = nonzero_indices(flat >= estimate)
    return superset if superset.numel() >= k else None


def _top_k_search(flat: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`(superset, values, kth)`: where to look (`top_k_superset`, None for all of `flat`), the entries
    there, and the `k`-th largest value of the 1-D `flat` (`1 <= k <= n`), exactly, in O(n)."""
    superset = top_k_superset(flat, k)
    values = flat if superset is None else flat.index_select(0, superset)
    return superset, values, torch.kthvalue(values, values.numel() - k + 1).values


def _at_least(values: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` entries of the 1-D `values` above `kth`, its `k`-th largest, completed with the first ties."""
    chosen = values > kth
    missing = k - int(torch.count_nonzero(chosen))
    if missing:
        chosen[(values == kth).nonzero().view(-1)[:missing]] = True
    return chosen


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` largest entries of `scores`; among equal scores the lower flat (row-major) index wins."""
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full(scores.shape, k >= n and n > 0, dtype=torch.bool, device=scores.device)
    return _at_least(flat, _top_k_search(flat, k)[2], k).view(scores.shape)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`top_k_mask` as ascending flat (row-major) indices.

    For a small `k` (a topology update moves a few percent of the weights) the selection, the ties and
    the `nonzero` run on the sampled superset only: one compare pass over all `n` entries, where
    `top_k_mask(...).nonzero()` costs three.
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.arange(n if k >= n else 0, device=flat.device)
    superset, values, kth = _top_k_search(flat, k)
    chosen = _at_least(values, kth, k).nonzero().view(-1)
    return chosen if superset is None else superset.index_select(0, chosen)


def ascending(indices: torch.Tensor) -> torch.Tensor:
    """`indices` sorted ascending (itself when it already is)."""
    if indices.numel() < 2 or bool((indices[1:] >= indices[:-1]).all()):
        return indices
    return indices.sort().values


def contains(ascending_set: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Bool, for each of `values`: whether it is in the ascending 1-D `ascending_set` (a binary search each: far
    cheaper than `torch.isin`, which sorts both)."""
    if not ascending_set.numel() or not values.numel():
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    ascending_set = ascending_set.contiguous()
    found = torch.searchsorted(ascending_set, values).clamp_(max=ascending_set.numel() - 1)
    return ascending_set.index_select(0, found) == values


class Outside:
    """Candidate positions without a full-size tensor: where the flat bool `mask` is False, except the flat
    indices `exclude` (positions where it is False), and the flat indices `also` (positions where it is True).

    A grow step's candidates are the inactive positions and the ones just dropped (or the inactive ones except
    those just pruned, for DSR); building them as a bool tensor costs two or three passes over the weights,
    where a selection needs them only at the few positions it looks at (`at`).

    Args:
        mask: the flat bool mask (not copied: do not write it while this is in use).
        also: distinct flat indices where `mask` is True that are candidates too.
        exclude: distinct flat indices where `mask` is False that are not candidates, and the same as a bool
            tensor of `mask`'s shape if one is at hand (`(indices, flags)`: a look-up instead of a search).
        active: the number of True entries of `mask`, if known (else counted).
    """

    def __init__(self, mask: torch.Tensor, also: torch.Tensor | None = None,
                 exclude: tuple[torch.Tensor, torch.Tensor | None] | None = None, active: int | None = None) -> None:
        self.mask = mask.reshape(-1)
        empty = torch.empty(0, dtype=torch.long, device=self.mask.device)
        self.also = empty if also is None else ascending(also.to(self.mask.device))
        indices, flags = (empty, None) if exclude is None else exclude
        self.exclude = ascending(indices.to(self.mask.device))
        self.excluded = None if flags is None or not self.exclude.numel() else flags.reshape(-1)
        self.numel = self.mask.numel()
        active = int(torch.count_nonzero(self.mask)) if active is None else active
        self.count = self.numel - active + self.also.numel() - self.exclude.numel()

    def at(self, indices: torch.Tensor) -> torch.Tensor:
        """Bool, for each of the flat `indices`: whether it is a candidate."""
        masked = self.mask.index_select(0, indices)
        chosen = masked.logical_not()
        if self.also.numel():
            inside = masked.nonzero().view(-1)
            chosen[inside] = contains(self.also, indices.index_select(0, inside))
        if self.excluded is not None:
            chosen &= self.excluded.index_select(0, indices).logical_not_()
        elif self.exclude.numel():
            chosen &= contains(self.exclude, indices).logical_not_()
        return chosen

    def full(self) -> torch.Tensor:
        """The candidates as a flat bool tensor."""
        return self.mask.logical_not().index_fill_(0, self.exclude, False).index_fill_(0, self.also, True)


def top_k_outside(scores: torch.Tensor, k: int, candidates: Outside) -> torch.Tensor:
    """`top_k_indices` among the `candidates` only (the others count as `-inf`), without a full-size copy of
    `scores` with the others masked: the same ascending flat indices, ties to the lower index.

    The threshold estimate is the one `top_k_superset` makes of the masked scores; the compare pass then runs
    on `scores` itself, and the superset keeps its candidates. Requires `k <= candidates.count`.
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if n > 4 * _SAMPLE and k < n // 8:
        positions = _sample_positions(n, flat.device)
        sample = flat.index_select(0, positions).masked_fill_(candidates.at(positions).logical_not_(), float("-inf"))
        rank = min(_SAMPLE, 5 * k * _SAMPLE // (4 * n) + 64)
        estimate = torch.kthvalue(sample, _SAMPLE - rank + 1).values
        if bool(estimate > float("-inf")):
            superset = nonzero_indices(flat >= estimate)
            superset = superset[candidates.at(superset)]
            if superset.numel() >= k:
                values = flat.index_select(0, superset)
                kth = torch.kthvalue(values, values.numel() - k + 1).values
                return superset[_at_least(values, kth, k).nonzero().view(-1)]
    allowed = candidates.full()
    chosen = top_k_indices(torch.where(allowed, flat, float("-inf")), k)
    return chosen[allowed[chosen]]


def random_indices(candidates: torch.Tensor | Outside, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` flat (row-major) indices drawn uniformly without replacement among the True `candidates` (a
    bool tensor, or an `Outside`).

    Costs O(count) when candidates are common: uniform draws over all positions, rejecting the others,
    and, when more distinct ones came than needed, a uniform subset of them (still a uniform subset of
    the candidates). Else O(n): a random permutation of the candidates.
    """
    if isinstance(candidates, Outside):
        flat, n, total, at = None, candidates.numel, candidates.count, candidates.at
        device = candidates.mask.device
    else:
        flat = candidates.reshape(-1)
        n, device = flat.numel(), flat.device
        total = int(torch.count_nonzero(flat)) if count else 0
        at = flat.__getitem__
    if not count:
        return torch.empty(0, dtype=torch.long, device=device)
    if count > total:
        raise ValueError(f"cannot draw {count} positions among {total} candidates")
    if 4 * count > total or 4 * total < n:
        indices = (candidates.full() if flat is None else flat).nonzero().view(-1)
        return indices[torch.randperm(total, generator=generator, device=device)[:count]]
    picked = torch.empty(0, dtype=torch.long, device=device)
    while picked.numel() < count:
        draws = torch.randint(n, ((count - picked.numel()) * n // total * 5 // 4 + 16,), generator=generator,
                              device=device)
        picked = torch.unique(torch.cat([picked, draws[at(draws)]]))
    if picked.numel() > count:
        picked = picked[torch.randperm(picked.numel(), generator=generator, device=device)[:count]]
    return picked


def index_mask(indices: torch.Tensor, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape`, True at the flat (row-major) `indices`."""
    mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=device)
    return mask.index_fill_(0, indices.to(device), True).view(shape)


def random_positions(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`random_indices` as a bool tensor of `candidates`' shape."""
    return index_mask(random_indices(candidates, count, generator), candidates.shape, candidates.device)


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
