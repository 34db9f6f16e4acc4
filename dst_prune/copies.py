"""Copies of a sparse model (an EMA) whose masks follow the controller's."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import DSTError
from .masked_weight import zero_outside
from .sparse_target import SparseTarget

if TYPE_CHECKING:
    from .sparsity import DynamicSparsity

__all__ = ["ModelCopies"]


def _has_mask(module: nn.Module, target: SparseTarget) -> bool:
    try:
        return isinstance(module.get_submodule(target.module_name)._buffers.get(target.tensor_name + "_mask"),
                          torch.Tensor)
    except AttributeError:
        return False


class ModelCopies:
    """`add_copy` / `sync_copies` of `DynamicSparsity`."""

    def add_copy(self: DynamicSparsity, module: nn.Module) -> None:
        """Keep a deep copy of the model (e.g. timm's `ModelEmaV3(...).module`) on this controller's masks.

        After every update (and `load_state_dict`, `prepare_for_ddp`) the copy's masks are set to the
        model's and its weights zeroed outside them, so an EMA never keeps decaying values at pruned
        positions. The copy is held weakly.
        """
        missing = [t.name for t in self.targets if not _has_mask(module, t)]
        if missing:
            raise DSTError(f"add_copy: the module has no dst_prune mask for {missing[0]}; pass a deep copy of the "
                           f"sparse model (copy.deepcopy(model) after apply, as timm's ModelEmaV3 makes).")
        self._copies.append(weakref.ref(module))
        self.sync_copies()

    def sync_copies(self: DynamicSparsity) -> None:
        """Set every copy's masks to the model's, with zero weights outside them."""
        self._copies = [ref for ref in self._copies if ref() is not None]
        for ref in self._copies:
            copy = ref()
            with torch.no_grad():
                for target in self.targets:
                    module = copy.get_submodule(target.module_name)
                    mask = module._buffers[target.tensor_name + "_mask"]
                    mask.copy_(target.mask)
                    zero_outside(module._parameters[target.tensor_name + "_orig"], mask)
