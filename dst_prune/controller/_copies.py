"""Copies of a sparse model (an EMA) whose masks follow the controller's."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .._masking.masked_weight import zero_outside
from .._masking.target import SparseTarget
from ..errors import DSTError

__all__ = ["ModelCopies"]


def _mask_of(module: nn.Module, target: SparseTarget) -> torch.Tensor | None:
    try:
        mask = module.get_submodule(target.module_name)._buffers.get(target.tensor_name + "_mask")
    except AttributeError:
        return None
    return mask if isinstance(mask, torch.Tensor) else None


class ModelCopies:
    """Deep copies of the model (held weakly) whose masks are set to the model's after every change.

    Args:
        targets: the controller's sparse tensors (the list itself: it sees the controller's updates).
    """

    def __init__(self, targets: Sequence[SparseTarget]) -> None:
        self.targets = targets
        self._copies: list[weakref.ref] = []

    def add(self, module: nn.Module) -> None:
        """Register a deep copy of the sparse model and give it the current masks.

        Raises:
            DSTError: the module has no dst_prune mask for one of the sparse tensors (a copy made before apply).
        """
        missing = [t.name for t in self.targets if _mask_of(module, t) is None]
        if missing:
            raise DSTError(f"add_copy: the module has no dst_prune mask for {missing[0]}; pass a deep copy of the "
                           f"sparse model (copy.deepcopy(model) after apply, as timm's ModelEmaV3 makes).")
        self._copies.append(weakref.ref(module))
        self.sync()

    def sync(self) -> None:
        """Set every live copy's masks to the model's, with zero weights outside them."""
        self._copies = [ref for ref in self._copies if ref() is not None]
        for ref in self._copies:
            copy = ref()
            with torch.no_grad():
                for target in self.targets:
                    module = copy.get_submodule(target.module_name)
                    mask = module._buffers[target.tensor_name + "_mask"]
                    mask.copy_(target.mask)
                    zero_outside(module._parameters[target.tensor_name + "_orig"], mask)
