"""The one `torch.nn.utils.prune` method of dst_prune, and everything that keeps it correct.

A sparse parameter keeps the standard pruning layout: the trainable `weight_orig` parameter, a
`torch.bool` buffer `weight_mask`, and a plain tensor `weight = weight_orig * weight_mask` recomputed
by a forward pre-hook (`DSTMask`). Masks are written in place, never replaced. Between forwards,
`weight` is kept a detached tensor so that `copy.deepcopy(model)` works after a training forward
(timm's `ModelEmaV3` relies on it). Parents that read a child's weight directly instead of calling the
child (`nn.MultiheadAttention.out_proj`, torchvision's `ShiftedWindowAttention`, timm's EVA/BEiT
attention, `nn.TransformerEncoderLayer`'s fast path, ...) get a pre-hook that recomputes the child's
weight first; they are found by reading their source (`direct_readers`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import prune

from .errors import DSTError
from .gradients import sink_for
from .groups import Grouping
from .masked_weight import masked_weight
from .sparse_target import SparseTarget
from .targets import TargetSpec

__all__ = [
    "DSTMask", "attach", "direct_readers", "is_sparse", "make_permanent", "mask_hooks", "require_optimizer",
    "unwrap_optimizer",
]

logger = logging.getLogger(__name__)

_READ_BY_PARENT = "_dst_prune_read_by_parent"
# attribute reads that only look at a weight's metadata, not its values
_METADATA = {"device", "dtype", "shape", "size", "ndim", "dim", "requires_grad", "is_cuda", "numel", "T"}


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
        return orig * getattr(module, self._tensor_name + "_mask")

    def __call__(self, module: nn.Module, inputs: object) -> None:
        """Recompute `weight = weight_orig * weight_mask` (and capture its dense gradient when armed)."""
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
            orig.mul_(module._buffers[name + "_mask"])
        if name in module.__dict__:
            delattr(module, name)
        del module._parameters[name + "_orig"]
        del module._buffers[name + "_mask"]
        setattr(module, name, orig)  # setattr keeps nn.RNNBase._flat_weights in sync


def _masked_names(module: nn.Module) -> list[str]:
    return [h._tensor_name for h in module._forward_pre_hooks.values() if isinstance(h, DSTMask)]


class DetachMaskedWeights:
    """Forward hook: swap each recomputed weight for its `.detach()` (the graph already holds it)."""

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        if module.__dict__.get(_READ_BY_PARENT, 0):
            return  # the parent still reads this weight; it detaches it after its own forward
        for name in _masked_names(module):
            weight = module.__dict__.get(name)
            if weight is not None and weight.requires_grad:  # (not grad_fn: torch.compile cannot trace it)
                setattr(module, name, weight.detach())


class ComputeChildWeights:
    """Forward pre-hook of a parent that reads its children's sparse weights without calling them."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self.entries = entries  # (child path relative to the parent, tensor name); strings only

    def __call__(self, parent: nn.Module, args: object) -> None:
        for path, name in self.entries:
            child = parent.get_submodule(path)
            for hook in child._forward_pre_hooks.values():
                if isinstance(hook, DSTMask) and hook._tensor_name == name:
                    hook(child, ())
                    child.__dict__[_READ_BY_PARENT] = child.__dict__.get(_READ_BY_PARENT, 0) + 1


class ReleaseChildWeights(ComputeChildWeights):
    """Forward hook of such a parent: detach the children's weights once the parent is done."""

    def __call__(self, parent: nn.Module, args: object, output: object = None) -> None:
        for path, name in self.entries:
            child = parent.get_submodule(path)
            count = child.__dict__.get(_READ_BY_PARENT, 0)
            if count:
                child.__dict__[_READ_BY_PARENT] = count - 1
            weight = child.__dict__.get(name)
            if name in _masked_names(child) and weight is not None and weight.requires_grad:
                setattr(child, name, weight.detach())


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer | None:
    """The `torch.optim.Optimizer` inside wrappers such as accelerate's `AcceleratedOptimizer`."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer


def require_optimizer(optimizer: object) -> torch.optim.Optimizer | None:
    """The `torch.optim.Optimizer` in `optimizer` (None for None); DSTError for anything else."""
    inner = unwrap_optimizer(optimizer)
    if optimizer is not None and inner is None:
        raise DSTError(f"optimizer must be a torch.optim.Optimizer (or a wrapper of one, such as accelerate's); "
                       f"received {type(optimizer).__name__}.")
    return inner


def optimizer_state_like(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> list[torch.Tensor]:
    """Every state tensor the optimizer keeps for `param` with `param`'s shape (momenta, moments, ...)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]


def fill_positions(tensor: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor, value: object) -> None:
    """Write `value` at `positions` (bool) of `tensor`, given also as flat row-major `indices`.

    A contiguous tensor is written at just those indices (a few percent of the weights per update)
    instead of a masked pass over all of it.
    """
    if tensor.is_contiguous():
        tensor.view(-1).index_fill_(0, indices.to(tensor.device), value)
    else:
        tensor.masked_fill_(positions.to(tensor.device), value)


def zero_positions(target: SparseTarget, indices: torch.Tensor, positions: torch.Tensor,
                   optimizer: torch.optim.Optimizer | None) -> None:
    """Zero the weight, its gradient and its optimizer state at `positions` (flat `indices` and bool)."""
    orig = target.orig
    with torch.no_grad():
        for tensor in (orig, orig.grad, *optimizer_state_like(optimizer, orig)):
            if tensor is not None:
                fill_positions(tensor, indices, positions, 0)


def attach(model: nn.Module, spec: TargetSpec, mask: torch.Tensor, grouping: Grouping | None = None) -> SparseTarget:
    """Attach the prune method to one parameter with `mask` (bool); the weights are left as they are."""
    module = model.get_submodule(spec.module_name)
    with torch.no_grad():
        DSTMask.apply(module, spec.tensor_name, mask=mask)
    if not any(isinstance(h, DetachMaskedWeights) for h in module._forward_hooks.values()):
        module.register_forward_hook(DetachMaskedWeights())
    return SparseTarget(spec, module, grouping)


def attach_readers(model: nn.Module, readers: dict[str, list[tuple[str, str]]]) -> None:
    """Register the parent hooks found by `direct_readers`."""
    for parent_name, entries in readers.items():
        parent = model.get_submodule(parent_name)
        parent.register_forward_pre_hook(ComputeChildWeights(entries))
        parent.register_forward_hook(ReleaseChildWeights(entries))


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
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, (DetachMaskedWeights, ComputeChildWeights))]:
                del hooks[key]
        module.__dict__.pop(_READ_BY_PARENT, None)
    return removed


def _method_source(cls: type, name: str) -> str:
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            return ""
        fn = vars(klass).get(name)
        if inspect.isfunction(fn):
            try:
                return inspect.getsource(fn)
            except (OSError, TypeError):
                return ""
    return ""


@functools.cache
def _attribute_chains(cls: type) -> frozenset[str]:
    """Dotted attribute chains `self.a.b.c` read by `cls.forward` and the methods of `cls` it calls."""
    chains: set[str] = set()
    pending, seen = ["forward"], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        source = _method_source(cls, name)
        for match in re.finditer(r"\bself((?:\.[A-Za-z_]\w*)+)(\s*\()?", source):
            chain, called = match.group(1)[1:], match.group(2)
            if called and "." not in chain:
                pending.append(chain)  # a method of the class: follow it
            else:
                chains.add(chain)
    return frozenset(chains)


def direct_readers(model: nn.Module, targets: list[TargetSpec]) -> dict[str, list[tuple[str, str]]]:
    """Find the modules whose code reads a descendant's sparse weight instead of calling the descendant.

    Returns:
        `{parent module name: [(child path relative to the parent, tensor name), ...]}`.
    """
    by_module: dict[str, set[str]] = {}
    for t in targets:
        by_module.setdefault(t.module_name, set()).add(t.tensor_name)
    readers: dict[str, list[tuple[str, str]]] = {}
    for parent_name, parent in model.named_modules():
        prefix = parent_name + "." if parent_name else ""
        found: set[tuple[str, str]] = set()
        for chain in _attribute_chains(type(parent)):
            parts = chain.split(".")
            for cut in range(1, len(parts)):
                path, name = ".".join(parts[:cut]), parts[cut]
                following = parts[cut + 1] if cut + 1 < len(parts) else None
                if name in by_module.get(prefix + path, ()) and following not in _METADATA:
                    found.add((path, name))
        if found:
            readers[parent_name] = sorted(found)
    return readers
