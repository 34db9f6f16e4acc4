"""The one `torch.nn.utils.prune` method of dst_prune, attached once per sparse parameter.

A sparse parameter keeps the standard pruning layout on the live model: the trainable `weight_orig`
parameter, a `torch.bool` buffer `weight_mask`, and `weight` recomputed by a forward pre-hook
(`DSTMask`), so `prune.is_pruned`, `prune.remove` and anything that knows pruning keep working. Masks are
written in place, never replaced. Between forwards, `weight` is kept a detached tensor so that
`copy.deepcopy(model)` works after a training forward (timm's `ModelEmaV3` relies on it).

Checkpoints are plain (DESIGN.md rule 9): `model.state_dict()` holds `weight` (the masked
`weight_orig`, zeros in place) and no mask, so it loads with `strict=True` into an untouched model; the
masks travel in the controller's `state_dict()`. A sparse model's `load_state_dict` takes plain state
dicts (its masks stay) and torch prune's `weight_orig`/`weight_mask` form (its masks are loaded).
`pruned_state_dict(model)` gives torch prune's form on request.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import prune

from .gradients import sink_for
from .groups import Grouping
from .masked_weight import masked_weight, zero_outside
from .sharding import refuse_fsdp1
from .sparse_target import SparseTarget
from .targets import TargetSpec

__all__ = ["READ_BY_PARENT", "DSTHook", "DSTMask", "attach", "is_sparse", "make_permanent", "mask_hooks",
           "masked_names", "pruned_state_dict"]

logger = logging.getLogger(__name__)

_PRUNE_KEYS = {"on": False}  # set by `pruned_state_dict` while it runs
#: how many parents currently read a module's sparse weight directly (see `readers`)
READ_BY_PARENT = "_dst_prune_read_by_parent"


class DSTHook:
    """Marker base of every hook dst_prune registers besides `DSTMask` (removed by `make_permanent`)."""


class DSTMask(prune.BasePruningMethod):
    """The pruning method attached once to every sparse parameter.

    Its mask is the `bool` buffer `<name>_mask`; dst_prune rewrites it in place when it reallocates, so
    the hook itself never changes and nothing accumulates across updates.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, mask: torch.Tensor | None = None) -> None:
        self._initial_mask = mask
        self._written: list = []  # what masked_weight last wrote (versions and pointers), to skip rewrites

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        if self._initial_mask is None:
            raise RuntimeError("DSTMask masks are written by dst_prune, not computed by torch.nn.utils.prune")
        mask, self._initial_mask = self._initial_mask, None
        return mask

    def apply_mask(self, module: nn.Module) -> torch.Tensor:
        orig = getattr(module, self._tensor_name + "_orig")
        return torch.where(getattr(module, self._tensor_name + "_mask"), orig, 0)

    def __call__(self, module: nn.Module, inputs: object) -> None:
        """Recompute `weight = weight_orig * weight_mask` (and capture its dense gradient when armed)."""
        if not isinstance(module._parameters.get(self._tensor_name + "_orig"), nn.Parameter):
            refuse_fsdp1(module, self._tensor_name, f"{type(module).__name__}.{self._tensor_name}")  # FSDP1
        weight = masked_weight(module, self._tensor_name, self._written)
        sink = sink_for(module, self._tensor_name)
        if sink is not None and weight.requires_grad:
            weight.register_hook(sink)
        setattr(module, self._tensor_name, weight)  # setattr keeps nn.RNNBase._flat_weights in sync

    def remove(self, module: nn.Module) -> None:
        """Make the pruning permanent in place: `weight` becomes the same Parameter, zeros included.

        Unlike the base method it keeps the parameter's storage, so optimizer state stays attached.
        """
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


def _mask_hook(module: nn.Module, name: str) -> DSTMask:
    return next(h for h in module._forward_pre_hooks.values() if isinstance(h, DSTMask) and h._tensor_name == name)


class DetachMaskedWeights(DSTHook):
    """Forward hook: swap each recomputed weight for its `.detach()` (the graph already holds it)."""

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        if module.__dict__.get(READ_BY_PARENT, 0):
            return  # the parent still reads this weight; it detaches it after its own forward
        for name in masked_names(module):
            weight = module.__dict__.get(name)
            if weight is not None and weight.requires_grad:  # (not grad_fn: torch.compile cannot trace it)
                setattr(module, name, weight.detach())


class PlainStateDict(DSTHook):
    """State-dict hook: `<name>_orig` saved as `<name>` (masked, zeros in place), `<name>_mask` left out.

    The keys come in the order of the untouched module's `state_dict`, so the two are interchangeable.
    """

    def __init__(self, order: list[str]) -> None:
        self.order = order  # the module's own parameter and buffer names before dst_prune, in order

    def __call__(self, module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        if _PRUNE_KEYS["on"]:
            return
        names = masked_names(module)
        with torch.no_grad():
            for name in names:  # make weight_orig exactly the effective weight (no-op unless it changed)
                masked_weight(module, name, _mask_hook(module, name)._written)
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
    """Load pre-hook: accept a plain `<name>` (the masks stay) or torch prune's `<name>_orig` + `<name>_mask`."""

    def __call__(self, module: nn.Module, state: dict, prefix: str, local_metadata: dict, strict: bool,
                 missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        for name in masked_names(module):
            plain, orig, mask = prefix + name, prefix + name + "_orig", prefix + name + "_mask"
            if plain in state and orig not in state:
                state[orig] = state.pop(plain)
            if mask not in state and orig in state:
                state[mask] = module._buffers[name + "_mask"]  # a plain state dict: keep this model's mask


@contextlib.contextmanager
def _prune_keys() -> Iterator[None]:
    previous, _PRUNE_KEYS["on"] = _PRUNE_KEYS["on"], True
    try:
        yield
    finally:
        _PRUNE_KEYS["on"] = previous


def pruned_state_dict(model: nn.Module, **kwargs: object) -> dict[str, torch.Tensor]:
    """`model.state_dict(**kwargs)` in torch prune's form: `<name>_orig` and bool `<name>_mask` for sparse tensors.

    For code that expects `torch.nn.utils.prune`'s keys. `model.state_dict()` itself is plain (loads into
    an untouched model); a sparse model loads either form.
    """
    with _prune_keys():
        return model.state_dict(**kwargs)


def attach(model: nn.Module, spec: TargetSpec, mask: torch.Tensor, grouping: Grouping | None = None) -> SparseTarget:
    """Attach the prune method to one parameter with `mask` (bool); the weights are left as they are."""
    module = model.get_submodule(spec.module_name)
    if not any(isinstance(h, PlainStateDict) for h in module._state_dict_hooks.values()):
        order = [n for n, v in (*module._parameters.items(), *module._buffers.items()) if v is not None
                 and n not in getattr(module, "_non_persistent_buffers_set", ())]
        module._register_state_dict_hook(PlainStateDict(order))
        module._register_load_state_dict_pre_hook(LoadEitherForm(), with_module=True)
    with torch.no_grad():
        DSTMask.apply(module, spec.tensor_name, mask=mask)
    if not any(isinstance(h, DetachMaskedWeights) for h in module._forward_hooks.values()):
        module.register_forward_hook(DetachMaskedWeights())
    return SparseTarget(spec, module, grouping)


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
        prune.remove(module, hook._tensor_name)
        removed += 1
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._state_dict_hooks,
                      module._load_state_dict_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(getattr(h, "hook", h), DSTHook)]:
                del hooks[key]
        module.__dict__.pop(READ_BY_PARENT, None)
    return removed
