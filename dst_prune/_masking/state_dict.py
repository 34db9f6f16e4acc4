"""State-dict hooks of a sparse module: plain checkpoints (masking rule 9, docs/design.md).

`model.state_dict()` holds `weight` (the masked `weight_orig`, zeros in place) and no mask, so it loads with
`strict=True` into an untouched model; the masks travel in the controller's `state_dict()`. A sparse
model's `load_state_dict` takes plain state dicts (its masks stay) and torch prune's `weight_orig` /
`weight_mask` form (its masks are loaded). `pruned_state_dict(model)` gives torch prune's form on request.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from .hook import DSTHook, DSTMask, masked_names

__all__ = ["LoadEitherForm", "PlainStateDict", "pruned_state_dict"]

#: set while `pruned_state_dict` runs: the state-dict hooks then leave torch prune's keys as they are
_PRUNE_FORM = contextvars.ContextVar("dst_prune_pruned_state_dict", default=False)


def _mask_hook(module: nn.Module, name: str) -> DSTMask:
    return next(h for h in module._forward_pre_hooks.values() if isinstance(h, DSTMask) and h._tensor_name == name)

class PlainStateDict(DSTHook):
    """State-dict hook: `<name>_orig` saved as `<name>` (masked, zeros in place), `<name>_mask` left out.

    The keys come in the order of the untouched module's `state_dict`, so the two are interchangeable.
    """

    def __init__(self, order: list[str]) -> None:
        self.order = order  # the module's own parameter and buffer names before dst_prune, in order

    def __call__(self, module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        if _PRUNE_FORM.get():
            return
        names = masked_names(module)
        for name in names:  # make weight_orig exactly the effective weight (no-op unless it changed)
            _mask_hook(module, name).mask_orig(module)
        segment = [k for k in state if k.startswith(prefix)]  # this module's own entries, then its children's
        values = {k: state.pop(k) for k in segment}
        own = [k[len(prefix):] for k in segment if "." not in k[len(prefix):]]
        for name in self.order + [n for n in own if n not in self.order]:
            if name.endswith(("_orig", "_mask")) and name[:-5] in names:
                continue
            source = prefix + name + ("_orig" if name in names else "")
            if source in values:
                state[prefix + name] = values[source]
        for key in segment:
            if "." in key[len(prefix):]:
                state[key] = values[key]


class LoadEitherForm(DSTHook):
    """Load pre-hook: accept a plain `<name>` (the masks stay) or torch prune's `<name>_orig` + `<name>_mask`.

    In torch prune's form `<name>_orig` is loaded with zeros outside `<name>_mask` (torch prune keeps the pruned
    values there; rule 3 keeps them zero, which a compiled forward relies on).

    A plain `<name>` with non-zero weights outside this model's mask (the weights of another step or run, loaded
    before the controller state that goes with them) is loaded whole, and its `DSTMask` is marked `unmatched`:
    nothing is masked away, and the forward, `dst.step()`, `state_dict()` masking and `remove` refuse until
    masks that fit those weights are loaded (`dst.load_state_dict`).
    """

    def __call__(self, module: nn.Module, state: dict, prefix: str, local_metadata: dict, strict: bool,
                 missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        for name in masked_names(module):
            plain, orig, mask = prefix + name, prefix + name + "_orig", prefix + name + "_mask"
            if plain in state and orig not in state:
                state[orig] = state.pop(plain)
                current = module._buffers[name + "_mask"]
                value = state[orig]
                if isinstance(value, torch.Tensor) and value.shape == current.shape and \
                        bool(value.detach().to(current.device).masked_select(~current).any()):
                    _mask_hook(module, name).unmatched = True
            if mask not in state and orig in state:
                state[mask] = module._buffers[name + "_mask"]  # a plain state dict: keep this model's mask
            elif mask in state and orig in state:  # torch prune's form keeps weights outside the mask: they go
                incoming_orig, incoming_mask = state[orig], state[mask]  # (as every forward would mask them away)
                if isinstance(incoming_orig, torch.Tensor) and isinstance(incoming_mask, torch.Tensor) and \
                        incoming_orig.shape == incoming_mask.shape:
                    state[orig] = torch.where(incoming_mask.to(incoming_orig.device).bool(), incoming_orig,
                                              incoming_orig.new_zeros(()))


@contextlib.contextmanager
def _prune_form() -> Iterator[None]:
    token = _PRUNE_FORM.set(True)
    try:
        yield
    finally:
        _PRUNE_FORM.reset(token)


def pruned_state_dict(model: nn.Module, **kwargs: object) -> dict[str, torch.Tensor]:
    """`model.state_dict(**kwargs)` in torch prune's form: `<name>_orig` and bool `<name>_mask` for sparse tensors.

    For code that expects `torch.nn.utils.prune`'s keys. `model.state_dict()` itself is plain (loads into
    an untouched model); a sparse model loads either form.
    """
    with _prune_form():
        return model.state_dict(**kwargs)
