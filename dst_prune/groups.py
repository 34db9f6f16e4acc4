"""Structured sparsity: the groups that are pruned, grown and counted as wholes (`granularity=`).

- `element` (default): every weight on its own.
- `kernel`: the whole `k x k` kernel of a convolution, one per (output, input) channel pair; a weight
  without kernel dimensions (a Linear's) groups per element.
- `channel`: a whole output channel (a row of a Linear's weight, a filter of a conv).
- `n:m` (e.g. `2:4`): in every block of `m` consecutive weights along the input dimension exactly `n` are
  active (the pattern sparse tensor cores accelerate); weights move only within their block.

A group's score is the mean of `|x|` over its elements (magnitude, gradient, momentum), so thresholds
and rankings compare groups of any size.
"""

from __future__ import annotations

import math
import re

import torch

from .errors import DSTError

__all__ = ["GRANULARITIES", "Grouping", "groupings_for", "parse_granularity", "top_k_per_block"]

GRANULARITIES = ("element", "kernel", "channel", "n:m")


def parse_granularity(granularity: object) -> tuple[str, int, int]:
    """`(kind, n, m)`: the kind, and for `n:m` the block pattern (0, 0 otherwise)."""
    if isinstance(granularity, str) and granularity in ("element", "kernel", "channel"):
        return granularity, 0, 0
    match = re.fullmatch(r"(\d+):(\d+)", granularity) if isinstance(granularity, str) else None
    if match and 0 < int(match.group(1)) < int(match.group(2)):
        return "n:m", int(match.group(1)), int(match.group(2))
    raise DSTError(f"granularity={granularity!r} is unknown; valid choices: element, kernel, channel, or 'n:m' with "
                   f"0 < n < m, e.g. '2:4'.")


class Grouping:
    """How one parameter's elements form groups.

    Attributes:
        kind: `element`, `kernel`, `channel` or `n:m`.
        shape: the parameter's shape.
        group_shape: the shape of group-level tensors (masks, scores).
        group_size: the elements per group.
        block: `m` for `n:m` (the group is then the element), else 0.
        keep: `n` for `n:m`, else 0.
    """

    def __init__(self, kind: str, shape: torch.Size | tuple[int, ...], block: int = 0, keep: int = 0) -> None:
        self.kind, self.shape, self.block, self.keep = kind, torch.Size(shape), block, keep
        if kind == "kernel" and len(shape) > 2:
            self.group_shape = self.shape[:2]
        elif kind == "channel":
            self.group_shape = self.shape[:1]
        else:
            self.group_shape = self.shape
        self.group_size = math.prod(self.shape) // math.prod(self.group_shape)
        self.n_groups = math.prod(self.group_shape)

    @property
    def elementwise(self) -> bool:
        return self.group_size == 1

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `|tensor|` over each group (float)."""
        magnitude = tensor.detach().abs().float()
        if self.elementwise:
            return magnitude
        return magnitude.reshape(*self.group_shape, -1).mean(-1)

    def below(self, tensor: torch.Tensor, threshold: float) -> torch.Tensor:
        """Bool group tensor: where the mean `|tensor|` of the group is under `threshold` (> 0).

        Elementwise on float32/float64, `-threshold < x < threshold` is two comparisons into bool tensors,
        without the float `|x|` that `reduce` allocates (a fresh weight-sized tensor costs more in page
        faults than the comparison itself). Half-precision weights take `reduce`, which compares in
        float32: against a bf16/fp16 tensor the threshold itself would be rounded to that precision.
        """
        if not self.elementwise or tensor.dtype not in (torch.float32, torch.float64):
            return self.reduce(tensor) < threshold
        tensor = tensor.detach()
        return tensor.lt(threshold).logical_and_(tensor.gt(-threshold))

    def group_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The group-level view of an element mask (a group is active as a whole)."""
        if self.elementwise:
            return mask
        return mask.reshape(*self.group_shape, -1)[..., 0]

    def expand(self, groups: torch.Tensor) -> torch.Tensor:
        """The element positions of a group-level bool tensor (a broadcast view)."""
        if self.elementwise:
            return groups
        return groups.reshape(*self.group_shape, *([1] * (len(self.shape) - len(self.group_shape)))).expand(self.shape)

    # --- n:m blocks ----------------------------------------------------------------------------
    def to_blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """`(blocks, m)`: consecutive weights along the input dimension (dim 1), for every other index."""
        moved = tensor.movedim(1, -1) if tensor.ndim > 2 else tensor
        return moved.reshape(-1, self.block)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_blocks`, in the parameter's shape."""
        if len(self.shape) > 2:
            moved_shape = (self.shape[0], *self.shape[2:], self.shape[1])
            return blocks.reshape(moved_shape).movedim(-1, 1)
        return blocks.reshape(self.shape)


def top_k_per_block(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """In each row of `scores` `(blocks, m)`, the `counts[row]` largest entries (ties: lower index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank < counts.view(-1, 1)


def groupings_for(granularity: object, names: list[str], shapes: list[torch.Size], *, sparsity: float,
                  distribution: str, gradual: bool) -> list[Grouping]:
    """One `Grouping` per sparse tensor, refusing what the granularity cannot do (before the model is touched)."""
    kind, n, m = parse_granularity(granularity)
    if kind == "n:m":
        if abs(sparsity - (1 - n / m)) > 1e-9:
            raise DSTError(f"granularity='{n}:{m}' keeps {n} of every {m} weights, so sparsity must be {1 - n / m:g}; "
                           f"received sparsity={sparsity}.")
        if distribution != "uniform":
            raise DSTError(f"granularity='{n}:{m}' gives every block, so every layer, the same density; pass "
                           f"distribution='uniform' (received {distribution!r}).")
        if gradual:
            raise DSTError(f"granularity='{n}:{m}' fixes the pattern from the start, and gradual pruning cannot keep "
                           f"it; use method static, set, dsr, rigl or snfs.")
        for name, shape in zip(names, shapes):
            if len(shape) < 2 or shape[1] % m:
                inputs = shape[1] if len(shape) > 1 else "no"
                raise DSTError(f"{name} has {inputs} inputs (dim 1), not a multiple of {m}: granularity '{n}:{m}' "
                               f"blocks {m} consecutive weights along the input dimension. Exclude it "
                               f"(exclude=[{name!r}]).")
    return [Grouping(kind, shape, block=m, keep=n) for shape in shapes]
