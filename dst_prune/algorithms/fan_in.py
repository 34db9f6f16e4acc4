"""Constant fan-in bookkeeping for SRigL: neuron (row) views of a weight and the exact budget scheme.

A layer with constant fan-in holds `n * k` active weights: `n` active neurons (output rows) with `k` active
inputs each, every other neuron ablated (no active weight). DESIGN.md fixes the count of every layer
exactly, so `n * k` must equal the layer's count. Two places need a scheme for that:

- **At `apply`** the distribution's per-layer counts `c_l` (summing to exactly `round((1 - sparsity) * N)`)
  are in general not multiples of the layer's `out_l` neurons. `plan_fan_in` gives every layer the fan-in
  `floor(c_l / out_l)` with all its neurons, and hands the few weights left over (fewer than the total
  number of neurons) to one layer, the *absorber*, whose count is then split as `n * k` with the fewest
  ablated neurons (the largest divisor `n <= out` of its count with `k <= fan-in of a dense row`); when no
  single layer can (its count would be a prime, say), two layers share it. The global total stays exact;
  every other layer matches its distribution's density to within one weight per neuron, and the absorber
  starts with a few neurons ablated (often none: when the counts divide). Only layers close to dense can
  make it impossible (a `DSTError` then asks for a slightly different sparsity).
- **At an update** a layer keeps its count `B` (budget never moves between layers), so the number of active
  neurons must divide `B`: `neurons_for` keeps the smallest divisor of `B` that is at least the number of
  neurons the ablation criterion keeps (so no neuron that passes it is ablated; a few of the most salient
  failing ones may stay), within `[ceil(B / fan-in), out]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import DSTError

__all__ = ["FanInPlan", "from_rows", "neurons_for", "plan_fan_in", "rows_of"]

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


def _candidate(counts: Sequence[int], outs: Sequence[int], fans: Sequence[int], absorber: int,
               greedy: bool) -> tuple[tuple[int, int], FanInPlan] | None:
    """The plan in which layer `absorber` takes the remainder; with `greedy`, other layers first take whole
    extra rows (fan-in + 1) by largest fractional share. Returns ((ablated neurons, deviation), plan)."""
    plan: FanInPlan = []
    for count, out in zip(counts, outs):
        plan.append((out, count // out) if count >= out else (count, 1))  # fewer weights than neurons: 1 each
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
    ablated = sum(out - p[0] for out, p in zip(outs, plan))
    deviation = sum(abs(p[0] * p[1] - c) for p, c in zip(plan, counts))
    return (ablated, deviation), plan


def _pair_candidate(counts: Sequence[int], outs: Sequence[int], fans: Sequence[int], helper: int,
                    absorber: int) -> tuple[tuple[int, int], FanInPlan] | None:
    """The plan in which layers `helper` and `absorber` share the remainder (when no single layer can take it):
    the helper tries every count within a few rows of its own, the absorber takes the rest."""
    plan: FanInPlan = [(out, count // out) if count >= out else (count, 1) for count, out in zip(counts, outs)]
    pair = sum(counts[i] - plan[i][0] * plan[i][1] for i in range(len(counts))) + sum(
        plan[i][0] * plan[i][1] for i in (helper, absorber))
    window = 4 * outs[helper] + pair - plan[helper][0] * plan[helper][1]
    best = None
    low = max(1, pair - outs[absorber] * fans[absorber], counts[helper] - window)
    for mine in range(low, min(outs[helper] * fans[helper], pair - 1, counts[helper] + window) + 1):
        n, m = _largest_split(mine, outs[helper], fans[helper]), _largest_split(pair - mine, outs[absorber],
                                                                               fans[absorber])
        if n and m:
            ablated = outs[helper] - n + outs[absorber] - m
            score = (ablated, abs(mine - counts[helper]) + abs(pair - mine - counts[absorber]))
            if best is None or score < best[0]:
                best = (score, mine, n, m)
    if best is None:
        return None
    _, mine, n, m = best
    plan[helper], plan[absorber] = (n, mine // n), (m, (pair - mine) // m)
    ablated = sum(out - p[0] for out, p in zip(outs, plan))
    return (ablated, sum(abs(p[0] * p[1] - c) for p, c in zip(plan, counts))), plan


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
    best = None
    for absorber in range(len(counts)):
        for greedy in (True, False):
            found = _candidate(counts, outs, fans, absorber, greedy)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
    for helper in range(len(counts)) if best is None else ():
        for absorber in range(len(counts)):
            found = _pair_candidate(counts, outs, fans, helper, absorber) if helper != absorber else None
            if found is not None and (best is None or found[0] < best[0]):
                best = found
    if best is None:
        raise DSTError(f"method='srigl' keeps the same number of active inputs in every active neuron of a layer, "
                       f"and {sum(counts)} active weights cannot be split that way over "
                       f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''} (per layer {list(counts)}). Pick "
                       f"a slightly different sparsity.")
    return best[1]
