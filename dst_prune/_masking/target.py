"""`SparseTarget`: one sparse parameter of a live model, with its element- and group-level views.

Sharded parameters (FSDP2) are `dst_prune.distributed.fsdp.ShardedTarget`, a subclass that overrides where
the tensors come from and how writes reach them; nothing here knows about sharding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from .._selection import index_mask
from ..groups import Grouping
from ..targets import TargetSpec
from .transaction import Transaction, fill

__all__ = ["SparseTarget"]


class SparseTarget:
    """A sparse parameter of a live model: finds its tensors on its module at every call.

    Looking them up each time (rather than holding the tensors) keeps it right after `model.to(...)`,
    `load_state_dict` or anything else that replaces a buffer. Algorithms work on groups
    (`group_mask`, `active_groups`, `scores`); for `granularity="element"` a group is a weight.

    Attributes:
        name: the qualified parameter name (`layer1.0.conv1.weight`).
        module_name, tensor_name: its module's qualified name and the attribute (`weight`).
        module: the module that owns it.
        hook: the `DSTMask` attached to it.
        grouping: what is pruned and grown as a whole (`granularity`).
        numel: its number of weights.
    """

    #: whether the mask buffer holds one rank's shard only (`ShardedTarget`)
    sharded = False

    def __init__(self, spec: TargetSpec, module: nn.Module, hook: prune.BasePruningMethod,
                 grouping: Grouping | None = None) -> None:
        self.name, self.module_name, self.tensor_name = spec.name, spec.module_name, spec.tensor_name
        self.module, self.hook = module, hook
        self.numel = module._parameters[spec.tensor_name + "_orig"].numel() if self.attached else 0
        self.grouping = grouping or Grouping(self.param.shape, spec.layout)

    @property
    def attached(self) -> bool:
        """Whether the mask is still attached (`dst_prune.remove` detaches it)."""
        return self.tensor_name + "_orig" in self.module._parameters

    @property
    def param(self) -> nn.Parameter:
        """The trainable `weight_orig`."""
        return self.module._parameters[self.tensor_name + "_orig"]

    @property
    def orig(self) -> torch.Tensor:
        """The weights an algorithm ranks (the full tensor)."""
        return self.param

    @property
    def buffer_mask(self) -> torch.Tensor:
        """The mask buffer itself."""
        return self.module._buffers[self.tensor_name + "_mask"]

    @property
    def mask(self) -> torch.Tensor:
        """The bool mask an algorithm reads (the full tensor)."""
        return self.buffer_mask

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def n_groups(self) -> int:
        return self.grouping.n_groups

    def full_mask(self) -> torch.Tensor:
        """The full mask (for a sharded parameter, a collective: call it on every rank)."""
        return self.mask

    def write_full_mask(self, full_mask: torch.Tensor) -> None:
        """Copy a full bool mask into the buffer, in place."""
        self.buffer_mask.copy_(full_mask)

    def local(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The part of a parameter-shaped tensor (weights, gradient, optimizer state) this process holds."""
        return tensor

    def active(self) -> int:
        """The number of active (unmasked) weights."""
        return int(torch.count_nonzero(self.mask))

    def group_mask(self) -> torch.Tensor:
        """The active groups (bool, `grouping.group_shape`)."""
        return self.grouping.group_mask(self.mask)

    def active_groups(self) -> int:
        return int(torch.count_nonzero(self.group_mask()))

    def scores(self, tensor: torch.Tensor) -> torch.Tensor:
        """Group scores of `tensor` (the weights, a gradient, a momentum): the mean `|x|` of each group."""
        return self.grouping.reduce(tensor)

    def write(self, indices: torch.Tensor, positions: torch.Tensor | None, active: bool,
              tensors: Sequence[torch.Tensor], transaction: Transaction | None) -> None:
        """Set the mask to `active` at flat row-major `indices` and zero `tensors` (parameter-shaped) there.

        `positions` is the same set as a bool tensor (needed where a tensor is not contiguous, e.g.
        channels_last; made here when missing). Every old value is recorded in `transaction` first.
        """
        if positions is None and not (self.mask.is_contiguous() and all(t.is_contiguous() for t in tensors)):
            positions = index_mask(indices, self.shape, self.mask.device)
        if transaction is not None:
            transaction.record(self, indices, positions, active, tensors)
        with torch.no_grad():
            fill(self.mask, indices, positions, active)
            for tensor in tensors:
                fill(tensor, indices, positions, 0)

    def refresh(self) -> None:
        """Recompute the effective `weight` from `weight_orig` and the mask now, detached, as the hook would."""
        self.hook.recompute(self.module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
