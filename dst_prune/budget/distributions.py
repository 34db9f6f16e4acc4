"""How the non-zero budget is split across layers, in exact integer counts.

Every distribution hands out exactly `round((1 - sparsity) * N)` non-zeros, `N` the number of
sparse parameters, using `apportion`: ideal real-valued shares, layers whose share exceeds their
size capped at dense with the excess handed to the others, then largest-remainder rounding in
exact rational arithmetic so that the counts add up to the budget.

- `uniform`: every layer gets the same density.
- `er` (Erdős–Rényi; Mocanu et al. 2018, eq. 1): density of a layer proportional to
  `(n_out + n_in) / (n_out * n_in)`, from the first two dimensions of its weight.
- `erk` (Erdős–Rényi-Kernel; Evci et al. 2020, sec. 3): density proportional to
  `sum(shape) / prod(shape)`, the kernel dimensions of a convolution included.
- `global`: no per-layer rule; the largest weights of the whole model are kept (see
  `_selection.global_top_k`), at least one per layer.
- a callable of your own, `weight(shape) -> float`: each layer's density is proportional to its value
  (uniform is `lambda shape: 1.0`; erk is `sum(shape) / prod(shape)`); values must be positive and finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

from ..errors import DSTError

__all__ = ["DISTRIBUTIONS", "LAYERWISE", "apportion", "layer_budgets", "layer_shares", "total_budget"]

LAYERWISE = ("uniform", "er", "erk")
#: `global`: the budget goes to the largest weights of the whole model (one-shot global magnitude pruning)
DISTRIBUTIONS = (*LAYERWISE, "global")


def total_budget(sparsity: float, n_sparse: int) -> int:
    """The number of non-zeros for a global `sparsity` over `n_sparse` parameters."""
    return round((1 - sparsity) * n_sparse)


def apportion(total: int, shares: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split the integer `total` in proportion to `shares`, never giving item `i` more than `caps[i]`.

    Items whose proportional share exceeds their cap get exactly the cap and the rest is re-split among
    the others; the final split rounds by largest remainder (ties to the lower index), in exact
    rational arithmetic, so the result always sums to `total`. Items with a zero share get nothing
    unless the others cannot hold the total, in which case the rest is split in proportion to room.

    Raises:
        ValueError: `total` is negative or larger than `sum(caps)`.
    """
    n = len(shares)
    if total < 0 or total > sum(caps):
        raise ValueError(f"cannot place {total} items in capacities summing to {sum(caps)}")
    counts = [0] * n
    open_items = [i for i in range(n) if caps[i] > 0 and shares[i] > 0]
    remaining = total
    while remaining and open_items:
        weight = sum(Fraction(shares[i]) for i in open_items)
        ideal = {i: Fraction(remaining) * Fraction(shares[i]) / weight for i in open_items}
        over = [i for i in open_items if ideal[i] >= caps[i] - counts[i]]
        if over:
            for i in over:
                remaining -= caps[i] - counts[i]
                counts[i] = caps[i]
            open_items = [i for i in open_items if i not in over]
            continue
        floors = {i: math.floor(ideal[i]) for i in open_items}
        leftover = remaining - sum(floors.values())
        by_remainder = sorted(open_items, key=lambda i: (-(ideal[i] - floors[i]), i))
        for rank, i in enumerate(by_remainder):
            counts[i] += floors[i] + (1 if rank < leftover else 0)
        remaining = 0
    if remaining:  # only items with zero share are left: fill them in proportion to their room
        room = [caps[i] - counts[i] for i in range(n)]
        for i, extra in enumerate(apportion(remaining, room, room)):
            counts[i] += extra
    return counts


Distribution = str | Callable[[tuple[int, ...]], float]


def _density_weight(shape: Sequence[int], distribution: Distribution) -> float:
    if callable(distribution):
        try:
            weight = distribution(tuple(shape))
        except Exception as error:
            raise DSTError(f"distribution={distribution!r} failed for a weight of shape {tuple(shape)} "
                           f"({type(error).__name__}: {error}).") from None
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise DSTError(f"distribution={distribution!r} returned {weight!r} for a weight of shape {tuple(shape)}; "
                           f"it must return a positive, finite density weight.")
        return float(weight)
    if distribution == "uniform" or len(shape) < 2:
        return 1.0
    dims = shape[:2] if distribution == "er" else shape
    return sum(dims) / math.prod(dims)


def layer_shares(shapes: Sequence[Sequence[int]], distribution: Distribution,
                 sizes: Sequence[int] | None = None) -> list[float]:
    """Each layer's share of the non-zeros under a layer-wise distribution (density weight times size).

    `sizes` counts the units the budget is in (groups; default: elements); the density weight always
    comes from the weight's shape.
    """
    sizes = sizes if sizes is not None else [math.prod(s) for s in shapes]
    return [_density_weight(s, distribution) * n for s, n in zip(shapes, sizes)]


def layer_budgets(shapes: Sequence[Sequence[int]], sparsity: float, distribution: Distribution,
                  sizes: Sequence[int] | None = None) -> list[int]:
    """The number of non-zeros of each layer.

    Args:
        shapes: the shape of each sparse tensor.
        sparsity: the global fraction of zeros over all of them, in [0, 1).
        distribution: one of `LAYERWISE`, or a callable `weight(shape)`.
        sizes: the number of groups of each layer, when the budget counts groups (structured sparsity).

    Returns:
        One count per layer, summing to exactly `round((1 - sparsity) * N)`.
    """
    if not callable(distribution) and distribution not in LAYERWISE:
        raise DSTError(f"distribution={distribution!r} is not layer-wise; valid choices: {', '.join(LAYERWISE)}.")
    sizes = sizes if sizes is not None else [math.prod(s) for s in shapes]
    return apportion(total_budget(sparsity, sum(sizes)), layer_shares(shapes, distribution, sizes), sizes)
