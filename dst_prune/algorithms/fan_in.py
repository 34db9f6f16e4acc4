"""Constant fan-in bookkeeping for SRigL: neuron (row) views of a weight and the exact budget scheme.

A layer with constant fan-in holds `n * k` active weights: `n` active neurons (output rows) with `k` active
inputs each, every other neuron ablated (no active weight). docs/design.md fixes the count of every layer
exactly, so `n * k` must equal the layer's count. Two places need a scheme for that:

- **At `apply`** the distribution's per-layer counts `c_l` (summing to exactly `round((1 - sparsity) * N)`)
  are in general not multiples of the layer's `out_l` neurons. `plan_fan_in` gives every layer the fan-in
  `floor(c_l / out_l)` with all its neurons, and hands the few weights left over (fewer than the total
  number of neurons) to one layer, the *absorber*, whose count is then split as `n * k` with the fewest
  ablated neurons (the largest divisor `n <= out` of its count with `k <= fan-in of a dense row`), or two
  layers share it (one taking a shape close to its own, the other the rest). Of these plans the one with
  the least `_cost` wins: the fraction of each layer's neurons ablated, plus the weights moved between
  layers as a fraction of the total (and a penalty where a layer's count would move by over a quarter).
  The global total stays exact, layers stay close to their distribution's counts, and at most a few
  neurons start ablated (none when the counts divide). Only layers close to dense can make it
  impossible (a `DSTError` then asks for a slightly different sparsity).
- **At an update** a layer keeps its count `B` (budget never moves between layers), so the number of active
  neurons must divide `B`: `neurons_for` keeps the smallest divisor of `B` that is at least the number of
  neurons the ablation criterion keeps (so no neuron that passes it is ablated; a few of the most salient
  failing ones may stay), within `[ceil(B / fan-in), out]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._selection import index_mask
from ..errors import DSTError

__all__ = ["FanInPlan", "from_rows", "neurons_for", "plan_fan_in", "row_sums", "rows_of", "top_k_per_row"]

#: per layer: (active neurons, fan-in)
FanInPlan = list[tuple[int, int]]


def rows_of(tensor: torch.Tensor, out_dim: int) -> torch.Tensor:
    """`tensor` as `[neurons, fan-in]`: dim `out_dim` first, every other dim flattened (a copy if needed)."""
    return tensor.movedim(out_dim, 0).reshape(tensor.shape[out_dim], -1)


def from_rows(rows: torch.Tensor, shape: torch.Size, out_dim: int) -> torch.Tensor:
    """The inverse of `rows_of`: `[neurons, fan-in]` back to the weight's `shape`."""
    moved = [shape[out_dim], *(s for i, s in enumerate(shape) if i != out_dim)]
    return rows.reshape(moved).movedim(0, out_dim)


def _largest_split(count: int, out: int, fan: int) -> int:
    """The most neurons `n <= out` that hold `count` weights with the same fan-in `<= fan`, or 0 if none."""
    for n in range(min(out, count), max(1, math.ceil(count / fan)) - 1, -1):
        if count % n == 0:
            return n
    return 0


def neurons_for(count: int, wanted: int, out: int, fan: int) -> int:
    """How many neurons stay active in a layer of `count` weights when the ablation criterion keeps `wanted`.

    The smallest divisor of `count` that is at least `wanted` (no neuron that passes is ablated), or, when
    `count` has none up to `out`, the largest one below it; always with a fan-in `count / n <= fan`.

    Raises:
        DSTError: `count` has no such divisor (masks that no constant fan-in can hold).
    """
    divisors = [n for n in range(max(1, math.ceil(count / fan)), out + 1) if count % n == 0]
    if not divisors:
        raise DSTError(f"{count} active weights cannot be split into neurons of equal fan-in (at most {out} neurons "
                       f"of at most {fan} inputs); method='srigl' needs the masks its own apply made.")
    above = [n for n in divisors if n >= wanted]
    return above[0] if above else divisors[-1]


def _cost(plan: FanInPlan, counts: Sequence[int], outs: Sequence[int]) -> float:
    """How far a plan is from the distribution: the fraction of each layer's neurons ablated (losing 13 of 32
    channels weighs more than 2 of 128), plus the weights moved between layers as a fraction of the total,
    plus a penalty for any layer whose count moves by more than a quarter."""
    total = sum(counts)
    return sum((out - n) / out + abs(n * k - c) / total + max(0.0, abs(n * k - c) / c - 0.25)
               for (n, k), c, out in zip(plan, counts, outs))


def _base(counts: Sequence[int], outs: Sequence[int]) -> FanInPlan:
    """Every neuron with fan-in `floor(count / out)`; a layer with fewer weights than neurons: one each."""
    return [(out, count // out) if count >= out else (count, 1) for count, out in zip(counts, outs)]


def _candidate(counts: Sequence[int], outs: Sequence[int], fans: Sequence[int], absorber: int,
               greedy: bool) -> FanInPlan | None:
    """The plan in which layer `absorber` takes the remainder; with `greedy`, other layers first take whole
    extra rows (fan-in + 1) by largest fractional share."""
    plan = _base(counts, outs)
    left = sum(counts) - sum(n * k for n, k in plan)
    if greedy:
        order = sorted((i for i in range(len(counts)) if i != absorber and plan[i][0] == outs[i]),
                       key=lambda i: (-(counts[i] - outs[i] * plan[i][1]) / outs[i], i))
        for i in order:
            if left >= outs[i] and plan[i][1] < fans[i]:
                plan[i] = (outs[i], plan[i][1] + 1)
                left -= outs[i]
    total = plan[absorber][0] * plan[absorber][1] + left
    n = _largest_split(total, outs[absorber], fans[absorber])
    if not n:
        return None
    plan[absorber] = (n, total // n)
    return plan


#: below this many weights a helper layer tries every count of its window, not only near-full shapes
_EXHAUSTIVE = 20000


def _pair_candidate(counts: Sequence[int], outs: Sequence[int], fans: Sequence[int], helper: int,
                    absorber: int) -> FanInPlan | None:
    """The plan in which layers `helper` and `absorber` share the remainder: the helper takes a shape close to
    its own (up to 3 neurons fewer, fan-in within 2; small layers: any count within a few rows), the
    absorber the rest."""
    plan = _base(counts, outs)
    pair = sum(counts) - sum(n * k for i, (n, k) in enumerate(plan) if i not in (helper, absorber))
    out, fan, k0 = outs[helper], fans[helper], max(1, counts[helper] // outs[helper])
    options = {n * k for n in range(max(1, out - 3), out + 1) for k in range(max(1, k0 - 2), min(fan, k0 + 2) + 1)}
    if out * fan <= _EXHAUSTIVE:
        window = 4 * out + pair - plan[helper][0] * plan[helper][1]
        options.update(range(max(1, counts[helper] - window), min(out * fan, counts[helper] + window) + 1))
    best, best_cost = None, math.inf
    for mine in sorted(v for v in options if 0 < v < pair and pair - v <= outs[absorber] * fans[absorber]):
        n, m = _largest_split(mine, out, fan), _largest_split(pair - mine, outs[absorber], fans[absorber])
        if n and m:
            trial = list(plan)
            trial[helper], trial[absorber] = (n, mine // n), (m, (pair - mine) // m)
            cost = _cost(trial, counts, outs)
            if cost < best_cost:
                best, best_cost = trial, cost
    return best


def plan_fan_in(counts: Sequence[int], outs: Sequence[int], fans: Sequence[int], names: Sequence[str]) -> FanInPlan:
    """(active neurons, fan-in) per layer with `sum(n * k) == sum(counts)` exactly (the module docstring's scheme).

    Args:
        counts: the distribution's active weights per layer (each at least 1).
        outs: the neurons (output rows) of each layer.
        fans: the inputs of a dense row of each layer (its fan-in when dense).
        names: the layers' names, for the error.

    Raises:
        DSTError: no layer can absorb the remainder (tiny models at sparsities whose count has no suitable divisor).
    """
    plans = [_candidate(counts, outs, fans, j, greedy) for j in range(len(counts)) for greedy in (True, False)]
    largest = sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:max(4, 8 - len(counts))]
    plans += [_pair_candidate(counts, outs, fans, h, a) for h in largest for a in largest if h != a]
    plans = [p for p in plans if p is not None]
    best = min(plans, key=lambda p: _cost(p, counts, outs)) if plans else None
    if best is None:
        raise DSTError(f"method='srigl' keeps the same number of active inputs in every active neuron of a layer, "
                       f"and {sum(counts)} active weights cannot be split that way over "
                       f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''} (per layer {list(counts)}). Pick "
                       f"a slightly different sparsity.")
    return best


def row_sums(flags: torch.Tensor) -> torch.Tensor:
    """The True entries of each row of a 2-D bool tensor (a byte sum when contiguous: several times `sum(1)`'s
    speed)."""
    return flags.view(torch.uint8).sum(1, dtype=torch.int32).long() if flags.is_contiguous() else flags.sum(1)


def _top_k_per_row_exact(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`top_k_per_row` by a partial selection (`topk`) of the largest count in every row."""
    largest = min(int(counts.max()), scores.shape[1])
    kth = torch.topk(scores, largest, dim=1, sorted=True).values.gather(1, (counts - 1).clamp(0, largest - 1)
                                                                          .view(-1, 1))
    kth[counts == 0] = float("inf")  # (a row that chooses nothing: nothing is above +inf, no score equals it)
    chosen = scores > kth
    ties = scores == kth
    missing = counts - row_sums(chosen)
    tied = row_sums(ties)
    chosen |= ties & ((missing >= tied) & (missing > 0)).view(-1, 1)  # every tie is chosen
    partial = ((missing > 0) & (missing < tied)).nonzero().view(-1)
    if partial.numel():  # the first `missing` ties of the row, by index
        some = ties.index_select(0, partial)
        some &= some.cumsum(1) <= missing.index_select(0, partial).view(-1, 1)
        chosen[partial] |= some
    return chosen


def top_k_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """In each row of the 2-D `scores`, the `counts[row]` largest entries (ties: lower index first), as a bool
    tensor of `scores`' shape: what a stable descending sort of every row gives, without sorting the rows.

    One partial selection (`topk` of the largest count plus one) ranks every row; a row whose `counts[row]`-th
    score is above the next one takes its first `counts[row]` entries as they are (no tie crosses its boundary),
    and the rows where one does are resolved exactly, ties by index. Scores must not be NaN; `-inf` entries are
    chosen last (by index) if a row asks for more than the others. (Sampling a threshold per row and ranking only
    the entries above it was measured slower on 2048 x 2048: the compaction costs what `topk` saves.)
    """
    rows, columns = scores.shape
    counts = counts.to(scores.device).long().clamp(max=columns)
    largest = int(counts.max()) if rows else 0
    if largest <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if largest >= columns:
        return _top_k_per_row_exact(scores, counts)
    values, indices = torch.topk(scores, largest + 1, dim=1, sorted=True)
    at = counts.view(-1, 1)
    clean = (values.gather(1, (at - 1).clamp(min=0)) > values.gather(1, at)).view(-1) | (counts == 0)
    taken = torch.arange(largest + 1, device=scores.device).view(1, -1) < at
    taken &= clean.view(-1, 1)
    flat = (indices + (torch.arange(rows, device=scores.device) * columns).view(-1, 1))[taken]
    chosen = index_mask(flat, scores.shape, scores.device)
    tied = (~clean).nonzero().view(-1)
    if tied.numel():
        chosen[tied] = _top_k_per_row_exact(scores.index_select(0, tied), counts.index_select(0, tied))
    return chosen
