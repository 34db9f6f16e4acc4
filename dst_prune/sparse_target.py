"""`SparseTarget`: one sparse parameter of a live model, with its element- and group-level views."""

from __future__ import annotations

import torch
from torch import nn

from .groups import Grouping
from .masked_weight import masked_weight
from .targets import TargetSpec

__all__ = ["SparseTarget"]


class SparseTarget:
    """A sparse parameter of a live model: finds its tensors on its module at every call.

    Looking them up each time (rather than holding the tensors) keeps it right after `model.to(...)`,
    `load_state_dict` or anything else that replaces a buffer. Algorithms work on groups
    (`group_mask`, `active_groups`, `scores`); for `granularity="element"` a group is a weight.
    """

    def __init__(self, spec: TargetSpec, module: nn.Module, grouping: Grouping | None = None) -> None:
        self.name, self.module_name, self.tensor_name = spec.name, spec.module_name, spec.tensor_name
        self.module = module
        self.numel = module._parameters[spec.tensor_name + "_orig"].numel() if self.attached else 0
        self.grouping = grouping or Grouping(self.orig.shape, spec.layout)

    @property
    def attached(self) -> bool:
        return self.tensor_name + "_orig" in self.module._parameters

    @property
    def orig(self) -> nn.Parameter:
        return self.module._parameters[self.tensor_name + "_orig"]

    @property
    def mask(self) -> torch.Tensor:
        return self.module._buffers[self.tensor_name + "_mask"]

    @property
    def shape(self) -> torch.Size:
        return self.orig.shape

    @property
    def n_groups(self) -> int:
        return self.grouping.n_groups

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

    def refresh(self) -> None:
        """Recompute the effective `weight` from `weight_orig` and the mask now, detached, as the hook would."""
        hook = next(h for h in self.module._forward_pre_hooks.values()
                    if getattr(h, "_tensor_name", None) == self.tensor_name and hasattr(h, "_written"))
        with torch.no_grad():
            # setattr (not __dict__) so that nn.RNNBase keeps its _flat_weights in sync
            setattr(self.module, self.tensor_name, masked_weight(self.module, self.tensor_name, hook._written))

    def __repr__(self) -> str:
        return f"SparseTarget({self.name!r})"
