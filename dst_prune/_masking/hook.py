"""The one `torch.nn.utils.prune` method of dst_prune, attached once per sparse parameter.

A sparse parameter keeps the standard pruning layout on the live model: the trainable `weight_orig`
parameter, a `torch.bool` buffer `weight_mask`, and `weight` recomputed by a forward pre-hook
(`DSTMask`), so `prune.is_pruned`, `prune.remove` and anything that knows pruning keep working. Masks are
written in place, never replaced. Between forwards, `weight` is kept a detached tensor so that
`copy.deepcopy(model)` works after a training forward (timm's `ModelEmaV3` relies on it). The state-dict
hooks that make checkpoints plain are in `state_dict`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import prune

from ..distributed.fsdp import refuse_fsdp1
from ..errors import DSTError
from .gradients import DenseGradient
from .masked_weight import mask_in_place, masked_weight, zero_outside

__all__ = ["READ_BY_PARENT", "DSTHook", "DSTMask", "is_sparse", "make_permanent", "mask_hooks",
           "masked_names"]

logger = logging.getLogger(__name__)

#: how many parents currently read a module's sparse weight directly (see `readers`)
READ_BY_PARENT = "_dst_prune_read_by_parent"


class DSTHook:
    """Marker base of every hook dst_prune registers besides `DSTMask` (removed by `make_permanent`)."""


class DSTMask(prune.BasePruningMethod):
    """The pruning method attached once to every sparse parameter.

    Its mask is the `bool` buffer `<name>_mask`; dst_prune rewrites it in place when it reallocates, so
    the hook itself never changes and nothing accumulates across updates.

    Attributes:
        sink: where the dense gradient of the recomputed weight goes while a method needs it (masking rule 6),
            else None. A deep copy of the model (an EMA) gets its hooks without a sink: it never captures.
        unmatched: `weight_orig` holds weights outside the mask (loaded before the masks that go with them);
            until such masks are loaded, nothing masks them away and the forward refuses.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, mask: torch.Tensor | None = None) -> None:
        self._initial_mask = mask
        self._written: list = []  # what masked_weight last wrote (versions and pointers), to skip rewrites
        self.sink: DenseGradient | None = None
        self.unmatched = False

    def __deepcopy__(self, memo: dict) -> DSTMask:
        copied = copy.copy(self)
        copied._written, copied.sink, copied._initial_mask = [], None, None
        memo[id(self)] = copied
        return copied

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        if self._initial_mask is None:
            raise RuntimeError("DSTMask masks are written by dst_prune, not computed by torch.nn.utils.prune")
        mask, self._initial_mask = self._initial_mask, None
        return mask

    def apply_mask(self, module: nn.Module) -> torch.Tensor:
        orig = getattr(module, self._tensor_name + "_orig")
        return torch.where(getattr(module, self._tensor_name + "_mask"), orig, 0)

    def check_matched(self, module: nn.Module, what: str) -> None:
        """Refuse (`DSTError`) while `weight_orig` holds weights outside its mask that no loaded mask explains yet."""
        if not self.unmatched:
            return
        orig, mask = module._parameters[self._tensor_name + "_orig"], module._buffers[self._tensor_name + "_mask"]
        if orig.shape == mask.shape and bool(orig.detach().masked_select(~mask).any()):
            raise DSTError(f"{type(module).__name__}.{self._tensor_name}: {what} refused: its weights were loaded "
                           f"with non-zero values outside its mask (a state dict of another step or run, without "
                           f"the controller state that goes with it). Nothing was discarded: load the matching "
                           f"controller state with dst.load_state_dict(...), or build a fresh model with "
                           f"dst_prune.load_sparse_state_dict(model, state_dict, masks=...).")
        self.unmatched = False  # the masks loaded since fit the weights

    def __call__(self, module: nn.Module, inputs: object) -> None:
        """Recompute `weight = weight_orig * weight_mask` (and capture its dense gradient when armed)."""
        if not isinstance(module._parameters.get(self._tensor_name + "_orig"), nn.Parameter):
            refuse_fsdp1(module, self._tensor_name, f"{type(module).__name__}.{self._tensor_name}")  # FSDP1
        self.check_matched(module, "the forward")
        weight = masked_weight(module, self._tensor_name, self._written)
        if self.sink is not None and weight.requires_grad:
            weight.register_hook(self.sink)
        setattr(module, self._tensor_name, weight)  # setattr keeps nn.RNNBase._flat_weights in sync

    def recompute(self, module: nn.Module) -> None:
        """Recompute the effective weight now, detached (after a mask or weight was written between forwards)."""
        if self.unmatched:
            return  # (nothing is masked away before matching masks are loaded)
        with torch.no_grad():
            setattr(module, self._tensor_name, masked_weight(module, self._tensor_name, self._written))

    def mask_orig(self, module: nn.Module) -> None:
        """Zero `weight_orig` outside the mask now, unless nothing changed since it last was (no attribute set)."""
        if self.unmatched:
            return  # (a state dict saved now keeps the loaded weights whole)
        with torch.no_grad():
            mask_in_place(module, self._tensor_name, self._written)

    def remove(self, module: nn.Module) -> None:
        """Make the pruning permanent in place: `weight` becomes the same Parameter, zeros included.

        Unlike the base method it keeps the parameter's storage, so optimizer state stays attached.
        """
        self.check_matched(module, "dst_prune.remove")
        name = self._tensor_name
        orig = module._parameters[name + "_orig"]
        with torch.no_grad():
            zero_outside(orig, module._buffers[name + "_mask"])
        if name in module.__dict__:
            delattr(module, name)
        del module._parameters[name + "_orig"]
        del module._buffers[name + "_mask"]
        setattr(module, name, orig)  # setattr keeps nn.RNNBase._flat_weights in sync


def masked_names(module: nn.Module) -> list[str]:
    """The names of `module`'s own tensors that dst_prune masks (`weight`, `weight_ih_l0`, ...)."""
    return [h._tensor_name for h in module._forward_pre_hooks.values() if isinstance(h, DSTMask)]


class DetachMaskedWeights(DSTHook):
    """Forward hook: swap each recomputed weight for its `.detach()` (the graph already holds it)."""

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        if module.__dict__.get(READ_BY_PARENT, 0):
            return  # the parent still reads this weight; it detaches it after its own forward
        for name in masked_names(module):
            weight = module.__dict__.get(name)
            if weight is not None and weight.requires_grad:  # (not grad_fn: torch.compile cannot trace it)
                setattr(module, name, weight.detach())


def mask_hooks(model: nn.Module) -> Iterator[tuple[nn.Module, DSTMask]]:
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, DSTMask):
                yield module, hook


def is_sparse(model: nn.Module) -> bool:
    """Whether dst_prune masks are attached anywhere in `model`."""
    return next(mask_hooks(model), None) is not None


def make_permanent(model: nn.Module) -> int:
    """Remove every dst_prune mask and hook, leaving plain parameters with the zeros in place."""
    removed = 0
    for module, hook in list(mask_hooks(model)):
        hook.check_matched(module, "dst_prune.remove")  # (before any hook is removed)
    for module, hook in list(mask_hooks(model)):
        prune.remove(module, hook._tensor_name)
        removed += 1
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._state_dict_hooks,
                      module._load_state_dict_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(getattr(h, "hook", h), DSTHook)]:
                del hooks[key]
        module.__dict__.pop(READ_BY_PARENT, None)
    return removed
