"""`SparseTarget`: one sparse parameter of a live model, with its element- and group-level views."""

from __future__ import annotations

import torch
from torch import nn

from .groups import Grouping
from .masked_weight import masked_weight, zero_outside
from .sharding import GatherScope, ShardLayout, is_dtensor, local_tensor
from .targets import TargetSpec

__all__ = ["SparseTarget"]


class SparseTarget:
    """A sparse parameter of a live model: finds its tensors on its module at every call.

    Looking them up each time (rather than holding the tensors) keeps it right after `model.to(...)`,
    `load_state_dict` or anything else that replaces a buffer. Algorithms work on groups
    (`group_mask`, `active_groups`, `scores`); for `granularity="element"` a group is a weight.

    Under FSDP2 (`dst_prune.sharding`) the parameter is a sharded DTensor and the mask buffer holds this
    rank's shard only (`sharded`); while an update runs (`scope` set) `orig` and `mask` are the full
    tensors, so an algorithm sees the same tensors as without sharding. `param` is always the parameter.
    """

    def __init__(self, spec: TargetSpec, module: nn.Module, grouping: Grouping | None = None) -> None:
        self.name, self.module_name, self.tensor_name = spec.name, spec.module_name, spec.tensor_name
        self.module = module
        self.numel = module._parameters[spec.tensor_name + "_orig"].numel() if self.attached else 0
        self.grouping = grouping or Grouping(self.param.shape, spec.layout)
        self.layout: ShardLayout | None = None  # set once the parameter is sharded (`shard_mask`)
        self.scope: GatherScope | None = None  # set while an update gathers full tensors
        self._counts = (0, 0)  # (active weights, active groups) while sharded: the same on every rank

    @property
    def attached(self) -> bool:
        return self.tensor_name + "_orig" in self.module._parameters

    @property
    def param(self) -> nn.Parameter:
        """The trainable `weight_orig` (a sharded DTensor under FSDP2)."""
        return self.module._parameters[self.tensor_name + "_orig"]

    @property
    def orig(self) -> torch.Tensor:
        """The weights: `param`, or while an update of a sharded parameter runs, its full tensor (read only)."""
        if self.scope is not None and self.layout is not None:
            return self.scope.full_weight(self)
        return self.param

    @property
    def buffer_mask(self) -> torch.Tensor:
        """The mask buffer itself (this rank's shard when `sharded`)."""
        return self.module._buffers[self.tensor_name + "_mask"]

    @property
    def mask(self) -> torch.Tensor:
        """The bool mask: the buffer, or while an update of a sharded parameter runs, the full mask."""
        if self.scope is not None and self.layout is not None:
            return self.scope.full_mask(self)
        return self.buffer_mask

    @property
    def sharded(self) -> bool:
        """Whether the mask buffer holds this rank's shard only (the parameter is sharded by FSDP2)."""
        return self.layout is not None

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def full_mask(self) -> torch.Tensor:
        """The full mask (gathered from the shards when `sharded`: a collective, call it on every rank)."""
        if self.layout is not None and self.scope is None:
            return self.layout.gather(self.buffer_mask)
        return self.mask

    def shard_mask(self) -> bool:
        """If FSDP2 sharded the parameter since, keep only this rank's shard of the mask. Returns whether it did.

        The buffer is replaced this once (by its local piece); from then on it is written in place. The
        shard's gradient is masked after FSDP's reduce-scatter by a post-accumulate-grad hook.
        """
        param = self.param
        if self.layout is not None or not is_dtensor(param):
            return False
        layout = ShardLayout(param)
        full = self.buffer_mask
        self.cache_counts(full)
        self.module._buffers[self.tensor_name + "_mask"] = layout.local_part(full).contiguous().clone()
        self.layout = layout
        param.register_post_accumulate_grad_hook(MaskShardGradient(self.module, self.tensor_name))
        with torch.no_grad():
            zero_outside(local_tensor(param), self.buffer_mask)
        return True

    def cache_counts(self, full_mask: torch.Tensor) -> None:
        """Remember the active counts of the full mask (read at rest without a collective when sharded)."""
        self._counts = (int(torch.count_nonzero(full_mask)),
                        int(torch.count_nonzero(self.grouping.group_mask(full_mask))))

    def write_full_mask(self, full_mask: torch.Tensor) -> None:
        """Copy a full bool mask into the buffer (its local piece when sharded), in place."""
        if self.layout is None:
            self.buffer_mask.copy_(full_mask)
            return
        self.buffer_mask.copy_(self.layout.local_part(full_mask.to(self.buffer_mask.device)))
        self.cache_counts(full_mask)

    @property
    def n_groups(self) -> int:
        return self.grouping.n_groups

    def active(self) -> int:
        """The number of active (unmasked) weights."""
        if self.layout is not None and self.scope is None:
            return self._counts[0]
        return int(torch.count_nonzero(self.mask))

    def group_mask(self) -> torch.Tensor:
        """The active groups (bool, `grouping.group_shape`)."""
        return self.grouping.group_mask(self.mask)

    def active_groups(self) -> int:
        if self.layout is not None and self.scope is None:
            return self._counts[1]
        return int(torch.count_nonzero(self.group_mask()))

    def scores(self, tensor: torch.Tensor) -> torch.Tensor:
        """Group scores of `tensor` (the weights, a gradient, a momentum): the mean `|x|` of each group."""
        return self.grouping.reduce(tensor)

    def refresh(self) -> None:
        """Recompute the effective `weight` from `weight_orig` and the mask now, detached, as the hook would.

        When sharded: zero the shard outside its mask (the next forward all-gathers the masked weight).
        """
        if self.layout is not None:
            with torch.no_grad():
                zero_outside(local_tensor(self.param), self.buffer_mask)
            return
        hook = next(h for h in self.module._forward_pre_hooks.values()
                    if getattr(h, "_tensor_name", None) == self.tensor_name and hasattr(h, "_written"))
        with torch.no_grad():
            # setattr (not __dict__) so that nn.RNNBase keeps its _flat_weights in sync
            setattr(self.module, self.tensor_name, masked_weight(self.module, self.tensor_name, hook._written))

    def __repr__(self) -> str:
        return f"SparseTarget({self.name!r})"


class MaskShardGradient:
    """Post-accumulate-grad hook of a sharded parameter: zero its gradient shard outside the mask shard.

    FSDP2 calls it after the reduce-scatter, so gradient clipping and the optimizer see the masked
    gradient (DESIGN.md rule 7), as under DDP. A callable object that finds the mask on its module.
    """

    def __init__(self, module: nn.Module, tensor_name: str) -> None:
        self.module, self.tensor_name = module, tensor_name

    def __call__(self, param: torch.Tensor) -> None:
        grad = local_tensor(param.grad)
        mask = self.module._buffers.get(self.tensor_name + "_mask")
        if grad is not None and mask is not None and grad.shape == mask.shape:
            with torch.no_grad():
                zero_outside(grad, mask)
