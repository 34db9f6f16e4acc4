"""Where a compact optimizer state lives: the active positions of a sparse parameter, in its memory order.

A sparse parameter (`weight_orig` of a module with a bool `weight_mask` buffer) keeps its per-weight
optimizer state as 1-D tensors over its active positions only. `SparseSlot` finds the mask on the module at
every call (as the controller's `SparseTarget` does), so it stays right after `model.to(...)` or a
reloaded buffer, and notices when the parameter stopped being sparse (`dst_prune.remove`).

Positions are flat indices in the parameter's memory order (row-major for a contiguous weight, NHWC for a
channels_last one), so reading and writing the active weights of the parameter and of its gradient are a
gather and a scatter on a view, with no copy of the weight. They are int32 where the parameter has fewer than
2**31 elements (4 bytes per active weight), int64 otherwise.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["SparseSlot", "active_indices", "flat", "memory_order", "remap"]


def memory_order(tensor: torch.Tensor) -> list[int] | None:
    """The permutation of `tensor`'s dimensions that makes it contiguous; None if no permutation does."""
    order = sorted(range(tensor.ndim), key=lambda d: (-tensor.stride(d), -tensor.shape[d]))
    return order if tensor.permute(order).is_contiguous() else None


def flat(tensor: torch.Tensor, order: list[int]) -> torch.Tensor:
    """`tensor` as a 1-D tensor in the memory order `order` of its parameter: a view where the layouts agree,
    else a copy (only ever read)."""
    permuted = tensor.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else permuted.reshape(-1)


def active_indices(mask: torch.Tensor, order: list[int]) -> torch.Tensor:
    """The flat positions (memory order) where `mask` is True, ascending; int32 when they fit."""
    indices = torch.nonzero(flat(mask, order)).view(-1)
    return indices.to(torch.int32) if mask.numel() < 2**31 else indices


def remap(values: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`values` (one per position of `old`) carried over to the positions `new` (both ascending).

    Survivors keep their value; positions only in `new` (grown) start at zero; positions only in `old`
    (pruned) are dropped.
    """
    if not old.numel():
        return values.new_zeros(new.shape[0])
    where = torch.searchsorted(old, new.to(old.dtype)).clamp_(max=old.numel() - 1)
    kept = values.index_select(0, where)
    return torch.where(old.index_select(0, where) == new, kept, kept.new_zeros(()))


class SparseSlot:
    """One sparse parameter as an optimizer sees it: its module (weakly) and the name of its tensor.

    Attributes:
        name: the parameter's qualified name (`layer1.0.conv1.weight`), for messages.
        order: the memory order of the parameter (`memory_order`).
        seen: `(mask, version)` when the state was last checked against the mask (a cheap test for "unchanged").
    """

    def __init__(self, module: nn.Module, tensor_name: str, name: str, order: list[int]) -> None:
        self.module = weakref.ref(module)
        self.tensor_name, self.name, self.order = tensor_name, name, order
        self.seen: tuple[weakref.ref, int] | None = None

    def mask_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The bool mask of `param`, or None if `param` is no longer the sparse parameter of its module."""
        module = self.module()
        if module is None or module._parameters.get(self.tensor_name + "_orig") is not param:
            return None
        mask = module._buffers.get(self.tensor_name + "_mask")
        if mask is None or mask.dtype != torch.bool or mask.shape != param.shape:
            return None
        return mask

    def unchanged(self, mask: torch.Tensor) -> bool:
        """Whether `mask` is the tensor last checked, not written since (its version counter says so)."""
        return self.seen is not None and self.seen[0]() is mask and self.seen[1] == mask._version

    def checked(self, mask: torch.Tensor) -> None:
        self.seen = (weakref.ref(mask), mask._version)
