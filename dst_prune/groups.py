"""Structured sparsity: the groups that are pruned, grown and counted as wholes (`granularity=`).

One class per granularity; the algorithms call the same methods on all of them:

- `Grouping` (`element`, the default): every weight on its own.
- `KernelGrouping` (`kernel`): the whole `k x k` kernel of a convolution, one per (output, input) channel
  pair; a weight without kernel dimensions (a Linear's) groups per element.
- `ChannelGrouping` (`channel`): a whole output channel (a row of a Linear's weight, a filter of a conv;
  a column of transformers' `Conv1D`, which stores its weight as input x output).
- `BlockGrouping` (`n:m`, e.g. `2:4`): in every block of `m` consecutive weights along the input dimension
  exactly `n` are active (the pattern sparse tensor cores accelerate); weights move only within their
  block, so budget never moves across layers.

A group's score is the mean of `|x|` over its elements (magnitude, gradient, momentum), so thresholds
and rankings compare groups of any size. `layout = (output dim, input dim)` of the weight: `(0, 1)` for
`nn.Linear` and convolutions, `(1, 0)` for transformers' `Conv1D`.
"""

from __future__ import annotations

import math
import re

import torch

from ._selection import random_indices, top_k_indices, top_k_mask
from .errors import DSTError

__all__ = ["GRANULARITIES", "BlockGrouping", "ChannelGrouping", "Grouping", "KernelGrouping", "groupings_for",
           "parse_granularity", "top_k_per_block"]

GRANULARITIES = ("element", "kernel", "channel", "n:m")
Layout = tuple[int, int]


class Grouping:
    """Every weight is its own group (`granularity="element"`); the base of the structured groupings.

    Attributes:
        name: the `granularity=` value.
        shape: the parameter's shape.
        layout: `(output dim, input dim)` of the weight.
        group_shape: the shape of group-level tensors (masks, scores).
        group_size: the elements per group.
        n_groups: the number of groups.
    """

    name = "element"
    #: whether budget may move between layers (DSR's and SNFS's redistribution)
    redistributes = True

    def __init__(self, shape: torch.Size | tuple[int, ...], layout: Layout = (0, 1)) -> None:
        self.shape, self.layout = torch.Size(shape), layout
        self.group_shape = self._group_shape()
        self.group_size = math.prod(self.shape) // max(1, math.prod(self.group_shape))
        self.n_groups = math.prod(self.group_shape)

    def _group_shape(self) -> torch.Size:
        return self.shape

    @property
    def elementwise(self) -> bool:
        return self.group_size == 1

    def grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as `(*group_shape, group_size)` (a view where the layout allows)."""
        return tensor.reshape(*self.group_shape, -1)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `|tensor|` over each group (float)."""
        magnitude = tensor.detach().abs().float()
        return magnitude if self.elementwise else self.grouped(magnitude).mean(-1)

    def below(self, tensor: torch.Tensor, threshold: float) -> torch.Tensor:
        """Bool group tensor: where the mean `|tensor|` of the group is under `threshold` (> 0), or not finite.

        Elementwise on float32/float64 this is two comparisons into bool tensors, without the float `|x|`
        that `reduce` allocates (a fresh weight-sized tensor costs more in page faults than the comparison
        itself): `not (x >= t or x <= -t)` also holds for NaN, and `isinf` adds the infinities, so a
        non-finite weight counts as the weakest (the non-finite policy of `dst_prune._scores`). Half
        precision takes `reduce`, which compares in float32 (against a bf16 tensor the threshold itself
        would be rounded).
        """
        if not self.elementwise or tensor.dtype not in (torch.float32, torch.float64):
            scores = self.reduce(tensor)
            return (scores < threshold).logical_or_(~torch.isfinite(scores))
        tensor = tensor.detach()
        return tensor.ge(threshold).logical_or_(tensor.le(-threshold)).logical_not_().logical_or_(tensor.isinf())

    def group_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The group-level view of an element mask (a group is active as a whole)."""
        return mask if self.elementwise else self.grouped(mask)[..., 0]

    def expand(self, groups: torch.Tensor) -> torch.Tensor:
        """The element positions of a group-level bool tensor (a broadcast view)."""
        if self.elementwise:
            return groups
        ones = [1] * (len(self.shape) - len(self.group_shape))
        return groups.reshape(*self.group_shape, *ones).expand(self.shape)

    def is_whole(self, mask: torch.Tensor) -> bool:
        """Whether the element `mask` is made of whole groups (and, for `n:m`, keeps the block pattern)."""
        return bool(torch.equal(self.expand(self.group_mask(mask)), mask))

    # --- selection (overridden where the pattern constrains it) --------------------------------
    def initial_groups(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        """The `count` best groups by `scores` (bool, group shape): the initial mask."""
        return top_k_mask(scores, count)

    def regrow(self, candidates: torch.Tensor, count: int, generator: torch.Generator,
               scores: torch.Tensor | None = None, dropped: torch.Tensor | None = None) -> torch.Tensor:
        """Flat group indices to grow: `count` of the `candidates` (flat bool) with the highest `scores`, or
        drawn at random (`scores=None`, in O(count)). `dropped` (flat indices just dropped) matters only to
        patterns that fix a count per block."""
        if scores is None:
            return random_indices(candidates, count, generator)
        grow = top_k_indices(torch.where(candidates.view(self.group_shape), scores.float(), float("-inf")), count)
        return grow[candidates[grow]]


class KernelGrouping(Grouping):
    """`granularity="kernel"`: the `k x k` kernel of each (output, input) channel pair of a convolution."""

    name = "kernel"

    def _group_shape(self) -> torch.Size:
        return self.shape[:2] if len(self.shape) > 2 else self.shape


class ChannelGrouping(Grouping):
    """`granularity="channel"`: whole output channels (along the layout's output dimension)."""

    name = "channel"

    def _group_shape(self) -> torch.Size:
        return torch.Size([self.shape[self.layout[0]]])

    def grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.movedim(self.layout[0], 0).reshape(self.shape[self.layout[0]], -1)

    def expand(self, groups: torch.Tensor) -> torch.Tensor:
        view = [1] * len(self.shape)
        view[self.layout[0]] = -1
        return groups.reshape(view).expand(self.shape)


class BlockGrouping(Grouping):
    """`granularity="n:m"`: `n` active weights in every block of `m` consecutive inputs (a group is a weight)."""

    name = "n:m"
    redistributes = False

    def __init__(self, shape: torch.Size | tuple[int, ...], layout: Layout = (0, 1), *, keep: int,
                 block: int) -> None:
        super().__init__(shape, layout)
        self.keep, self.block = keep, block

    def to_blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """`(blocks, m)`: consecutive weights along the input dimension, for every other index."""
        return tensor.movedim(self.layout[1], -1).reshape(-1, self.block)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_blocks`, in the parameter's shape."""
        moved = list(self.shape)
        moved.append(moved.pop(self.layout[1]))
        return blocks.reshape(moved).movedim(-1, self.layout[1])

    def is_whole(self, mask: torch.Tensor) -> bool:
        return bool((self.to_blocks(mask).sum(1) == self.keep).all())

    def initial_groups(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        return self.from_blocks(top_k_per_block(self.to_blocks(scores), torch.full((self.n_groups // self.block,),
                                                                                    self.keep)))

    def regrow(self, candidates: torch.Tensor, count: int, generator: torch.Generator,
               scores: torch.Tensor | None = None, dropped: torch.Tensor | None = None) -> torch.Tensor:
        """In every block, as many of the best-scoring candidates as were `dropped` there (`count` follows)."""
        if scores is None:
            scores = torch.rand(self.group_shape, generator=generator, device=candidates.device)
        shaped = candidates.view(self.group_shape)
        lost = torch.zeros(self.n_groups, dtype=torch.bool, device=candidates.device)
        if dropped is not None:
            lost.index_fill_(0, dropped.to(candidates.device), True)
        block_scores = self.to_blocks(scores.float().masked_fill(~shaped, float("-inf")))
        chosen = self.from_blocks(top_k_per_block(block_scores, self.to_blocks(lost.view(self.group_shape)).sum(1)))
        return (chosen & shaped).reshape(-1).nonzero().view(-1)


def top_k_per_block(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """In each row of `scores` `(blocks, m)`, the `counts[row]` largest entries (ties: lower index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank < counts.to(scores.device).view(-1, 1)


_CLASSES = {"element": Grouping, "kernel": KernelGrouping, "channel": ChannelGrouping}


def parse_granularity(granularity: object) -> tuple[str, int, int]:
    """`(name, n, m)`: the granularity, and for `n:m` the block pattern (0, 0 otherwise)."""
    if isinstance(granularity, str) and granularity in _CLASSES:
        return granularity, 0, 0
    match = re.fullmatch(r"(\d+):(\d+)", granularity) if isinstance(granularity, str) else None
    if match and 0 < int(match.group(1)) < int(match.group(2)):
        return "n:m", int(match.group(1)), int(match.group(2))
    raise DSTError(f"granularity={granularity!r} is unknown; valid choices: element, kernel, channel, or 'n:m' with "
                   f"0 < n < m, e.g. '2:4'.")


def make_grouping(granularity: object, shape: torch.Size | tuple[int, ...], layout: Layout = (0, 1)) -> Grouping:
    """The `Grouping` of one parameter for `granularity`."""
    name, n, m = parse_granularity(granularity)
    if name == "n:m":
        return BlockGrouping(shape, layout, keep=n, block=m)
    return _CLASSES[name](shape, layout)


def groupings_for(granularity: object, names: list[str], shapes: list[torch.Size], *, sparsity: float,
                  distribution: object, gradual: bool, layouts: list[Layout] | None = None) -> list[Grouping]:
    """One `Grouping` per sparse tensor, refusing what the granularity cannot do (before the model is touched)."""
    name, n, m = parse_granularity(granularity)
    layouts = layouts or [(0, 1)] * len(shapes)
    if name == "n:m":
        if abs(sparsity - (1 - n / m)) > 1e-9:
            raise DSTError(f"granularity='{n}:{m}' keeps {n} of every {m} weights, so sparsity must be {1 - n / m:g}; "
                           f"received sparsity={sparsity}.")
        if distribution != "uniform":
            raise DSTError(f"granularity='{n}:{m}' gives every block, so every layer, the same density; pass "
                           f"distribution='uniform' (received {distribution!r}).")
        if gradual:
            raise DSTError(f"granularity='{n}:{m}' fixes the pattern from the start, and gradual pruning cannot keep "
                           f"it; use a method that keeps a constant count of weights.")
        for tensor, shape, layout in zip(names, shapes, layouts):
            if len(shape) < 2 or shape[layout[1]] % m:
                inputs = shape[layout[1]] if len(shape) > 1 else "no"
                raise DSTError(f"{tensor} has {inputs} inputs (dim {layout[1]}), not a multiple of {m}: granularity "
                               f"'{n}:{m}' blocks {m} consecutive weights along the input dimension. Exclude it "
                               f"(exclude=[{tensor!r}]).")
    return [make_grouping(granularity, shape, layout) for shape, layout in zip(shapes, layouts)]
