"""Where a layer's output channels sit in a tensor, and how shape operations move them (for `format="shrink"`).

A `Layout` says which dimension of a tensor holds a layer's channels and how many elements each channel has
along it. The shape operations that `dst_prune.exporting._channel_flow` follows (flatten, permute, transpose, squeeze,
unsqueeze, a mean over other dims, broadcasting arithmetic) are functions from a layout to a layout; each
raises `UnprovenError` where the result depends on something the traced graph does not say (an unknown rank, a
flatten that merges the channels with the batch), so that no operation is followed on a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = ["Layout", "UnprovenError"]


class UnprovenError(Exception):
    """An operation whose effect on the channels cannot be proven from the graph; the message says why."""


@dataclass(frozen=True)
class Layout:
    """Where the channels of a tracked tensor are.

    Attributes:
        axis: the channel dimension, counted from the end: -1 for a Linear's features, -3 for an N,C,H,W map.
        ndim: the tensor's rank, where known (a Conv2d's output is taken to be a batched N,C,H,W map).
        span: consecutive elements per channel along `axis` (H*W once a map is flattened); None: not known.
        trailing: elements per channel in the dims after `axis` (H*W of a map); None: not known.
    """

    axis: int
    ndim: int | None
    span: int | None = 1
    trailing: int | None = 1

    def relative(self, dim: int) -> int:
        """`dim` counted from the end; `UnprovenError` for a dim counted from the front of a tensor of unknown rank."""
        if dim < 0:
            return dim
        if self.ndim is None:
            raise UnprovenError(f"it indexes dimension {dim} of a tensor whose rank is not known from the graph")
        if dim >= self.ndim:
            raise UnprovenError(f"dimension {dim} is out of range for a tensor of rank {self.ndim}")
        return dim - self.ndim

    def _rank(self, operation: str) -> int:
        if self.ndim is None:
            raise UnprovenError(f"{operation} of a tensor whose rank is not known from the graph")
        return self.ndim

    def flatten(self, start: int, end: int) -> Layout:
        """The layout after `flatten(start, end)`: the channels stay apart if the merge starts at them or misses
        them."""
        ndim = self._rank("a flatten")
        start, end = self.relative(start) + ndim, self.relative(end) + ndim
        axis = self.axis + ndim
        if start >= end:
            return self
        new_ndim = ndim - (end - start)
        if end < axis or start > axis:  # the channels are not merged
            return replace(self, axis=(axis - (end - start) if end < axis else axis) - new_ndim, ndim=new_ndim)
        if start < axis:
            raise UnprovenError("it flattens the channel dimension together with the dimensions before it, which "
                                "interleaves the channels")
        if end == ndim - 1:  # channel-major: each channel's trailing elements follow one another
            span = None if self.span is None or self.trailing is None else self.span * self.trailing
            return Layout(axis=-1, ndim=new_ndim, span=span, trailing=1)
        return Layout(axis=start - new_ndim, ndim=new_ndim, span=None, trailing=None)

    def permute(self, dims: Sequence[int]) -> Layout:
        if self.ndim is not None and len(dims) != self.ndim:
            raise UnprovenError(f"it permutes {len(dims)} dimensions of a tensor of rank {self.ndim}")
        ndim = len(dims)
        order = [d % ndim for d in dims]
        if sorted(order) != list(range(ndim)):
            raise UnprovenError(f"it permutes with the dimensions {tuple(dims)}")
        position = order.index(self.axis + ndim)
        trailing = 1 if position == ndim - 1 else None
        return replace(self, axis=position - ndim, ndim=ndim, trailing=trailing)

    def transpose(self, dim0: int, dim1: int) -> Layout:
        a, b = self.relative(dim0), self.relative(dim1)
        if self.axis not in (a, b):  # swapping a dim before the channels with one after changes what trails them
            return replace(self, trailing=None) if (a > self.axis) != (b > self.axis) else self
        new_axis = b if self.axis == a else a
        return replace(self, axis=new_axis, trailing=1 if new_axis == -1 else None)

    def reduce(self, dims: Sequence[int], keepdim: bool) -> Layout:
        """The layout after a mean (or max) over `dims`, which must miss the channel dimension."""
        relative = sorted({self.relative(d) for d in dims})
        if self.axis in relative:
            raise UnprovenError("it reduces over the channel dimension")
        after = [d for d in relative if d > self.axis]
        trailing = 1 if after and len(after) == -self.axis - 1 else None if after else self.trailing
        if keepdim:
            return replace(self, trailing=trailing)
        ndim = None if self.ndim is None else self.ndim - len(relative)
        return Layout(axis=self.axis + len(after), ndim=ndim, span=self.span, trailing=trailing)

    def squeeze(self, dim: int) -> Layout:
        """`squeeze(dim)` of a dimension after the channels that is known to have size 1."""
        d = self.relative(dim)
        if d <= self.axis or self.trailing != 1:
            raise UnprovenError(f"it squeezes dimension {dim}, which is not known to have size 1")
        return replace(self, axis=self.axis + 1, ndim=None if self.ndim is None else self.ndim - 1)

    def unsqueeze(self, dim: int) -> Layout:
        ndim = self._rank("an unsqueeze")
        position = dim if dim >= 0 else dim + ndim + 1
        if not 0 <= position <= ndim:
            raise UnprovenError(f"it unsqueezes dimension {dim} of a tensor of rank {ndim}")
        axis = self.axis + ndim
        return replace(self, axis=(axis + 1 if position <= axis else axis) - (ndim + 1), ndim=ndim + 1)

    def merge(self, other: Layout) -> Layout:
        """The layout of an elementwise operation of two tracked tensors (broadcasting aligns from the end)."""
        if self.axis != other.axis:
            raise UnprovenError(f"it combines tensors whose channels are in different dimensions ({self.axis} and "
                                f"{other.axis} from the end)")
        if None not in (self.span, other.span) and self.span != other.span:
            raise UnprovenError("it combines tensors whose channels span different numbers of elements")
        span = self.span if self.span is not None else other.span
        ndim = None if None in (self.ndim, other.ndim) else max(self.ndim, other.ndim)
        trailing = self.trailing if self.trailing == other.trailing else None
        return Layout(axis=self.axis, ndim=ndim, span=span, trailing=trailing)
