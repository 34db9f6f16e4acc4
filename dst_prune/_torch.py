"""Every private or fragile PyTorch API dst_prune relies on, in one place, each pinned by a test.

torch does not promise to keep these; when one moves, this module is the only one to change, and
`tests/test_torch_private.py` names which. The public API is used wherever torch has one (the state-dict
hooks where torch has their public spelling).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["DDP_IGNORE_ATTRIBUTE", "ddp_ignore", "is_flat_param_view", "is_view", "local_shape_and_offset",
           "method_source", "refresh_rnn_flat_weights", "register_load_state_dict_pre_hook",
           "register_state_dict_hook", "set_nested_element"]


def register_state_dict_hook(module: nn.Module, hook: Callable) -> object:
    """Register `hook(module, state_dict, prefix, local_metadata) -> None` to edit `module.state_dict()` in place."""
    if hasattr(module, "register_state_dict_post_hook"):
        return module.register_state_dict_post_hook(hook)
    return module._register_state_dict_hook(hook)  # torch 2.4


def register_load_state_dict_pre_hook(module: nn.Module, hook: Callable) -> object:
    """Register `hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors)` to run
    before `module.load_state_dict` reads its own entries."""
    if hasattr(module, "register_load_state_dict_pre_hook"):
        return module.register_load_state_dict_pre_hook(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


def is_view(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a view of another tensor's memory (`Tensor._is_view`)."""
    return tensor._is_view()


def refresh_rnn_flat_weights(module: nn.Module) -> None:
    """Rebuild `nn.RNNBase._flat_weights` after its parameters were replaced (`RNNBase._init_flat_weights`)."""
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


#: the attribute `DistributedDataParallel` reads for the parameters and buffers it must not broadcast
DDP_IGNORE_ATTRIBUTE = "_ddp_params_and_buffers_to_ignore"


def ddp_ignore(model: nn.Module, names: Iterable[str]) -> None:
    """Tell a `DistributedDataParallel` built on `model` later not to broadcast the named buffers."""
    existing = set(getattr(model, DDP_IGNORE_ATTRIBUTE, ()))
    setattr(model, DDP_IGNORE_ATTRIBUTE, sorted(existing | set(names)))


def is_flat_param_view(tensor: object) -> bool:
    """Whether `tensor` is FSDP1's flat parameter or a view of one (`FlatParameter._is_flat_param`)."""
    base = getattr(tensor, "_base", None)
    return bool(getattr(base, "_is_flat_param", False) or getattr(tensor, "_is_flat_param", False))


def local_shape_and_offset(shape: torch.Size, mesh: object, placements: tuple) -> tuple[tuple[int, ...],
                                                                                        tuple[int, ...]]:
    """The shape of this rank's shard of a DTensor and the global index of its first element, per dimension."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(local_shape), tuple(offset)


def set_nested_element(state: dict, path: tuple, value: object) -> None:
    """Set `value` at the nested key `path` of a DCP state dict (`torch.distributed.checkpoint._traverse`)."""
    from torch.distributed.checkpoint._traverse import set_element

    set_element(state, path, value)


def method_source(cls: type, name: str) -> str:
    """The source of method `name` as `cls` resolves it (nn.Module's own excluded), or "" when unavailable.

    Fragile by nature (it reads source code): used only to find parents that read a child's weight
    directly (`dst_prune._masking.readers`), where a miss falls back to the child's own hook.
    """
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            return ""
        function = vars(klass).get(name)
        if inspect.isfunction(function):
            try:
                return inspect.getsource(function)
            except (OSError, TypeError):
                return ""
    return ""
