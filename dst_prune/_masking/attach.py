"""Attaching one sparse parameter: its `DSTMask`, the module's plain state-dict hooks and the weight detach.

Kept apart from `hook.py` so that the state-dict hooks (`state_dict.py`), which read the masks `hook.py`
defines, and the masks themselves import in one direction only.
"""

from __future__ import annotations

import torch
from torch import nn

from .._torch import register_load_state_dict_pre_hook, register_state_dict_hook
from ..groups import Grouping
from ..targets import TargetSpec
from .hook import DetachMaskedWeights, DSTMask
from .state_dict import LoadEitherForm, PlainStateDict
from .target import SparseTarget

__all__ = ["attach"]


def attach(model: nn.Module, spec: TargetSpec, mask: torch.Tensor, grouping: Grouping | None = None) -> SparseTarget:
    """Attach the prune method to one parameter with `mask` (bool); the weights are left as they are."""
    module = model.get_submodule(spec.module_name)
    if not any(isinstance(h, PlainStateDict) for h in module._state_dict_hooks.values()):
        order = [n for n, v in (*module._parameters.items(), *module._buffers.items()) if v is not None
                 and n not in getattr(module, "_non_persistent_buffers_set", ())]
        register_state_dict_hook(module, PlainStateDict(order))
        register_load_state_dict_pre_hook(module, LoadEitherForm())
    with torch.no_grad():
        hook = DSTMask.apply(module, spec.tensor_name, mask=mask)
    if not any(isinstance(h, DetachMaskedWeights) for h in module._forward_hooks.values()):
        module.register_forward_hook(DetachMaskedWeights())
    return SparseTarget(spec, module, hook, grouping)
