"""Parents that read a child's sparse weight directly instead of calling the child (masking rule 5 (docs/design.md)).

`nn.MultiheadAttention` passes `out_proj.weight` straight into a functional call, torchvision's
`ShiftedWindowAttention` reads `qkv.weight`/`proj.weight`, several timm attention blocks do the same.
Such a parent would see a stale (or graph-attached) weight, so it gets a pre-hook that recomputes the
child's masked weight first, and a hook that detaches it afterwards. They are found by reading the
source of each module's `forward` (and the methods it calls) for `self.<child>.<weight>`.
"""

from __future__ import annotations

import functools
import re

from torch import nn

from .._torch import method_source
from ..targets import TargetSpec
from .hook import READ_BY_PARENT, DSTHook, DSTMask, masked_names

__all__ = ["ComputeChildWeights", "ReleaseChildWeights", "attach_readers", "direct_readers"]

# attribute reads that only look at a weight's metadata, not its values
_METADATA = {"device", "dtype", "shape", "size", "ndim", "dim", "requires_grad", "is_cuda", "numel", "T"}


class ComputeChildWeights(DSTHook):
    """Forward pre-hook of a parent that reads its children's sparse weights without calling them."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self.entries = entries  # (child path relative to the parent, tensor name); strings only

    def __call__(self, parent: nn.Module, args: object) -> None:
        for path, name in self.entries:
            child = parent.get_submodule(path)
            for hook in child._forward_pre_hooks.values():
                if isinstance(hook, DSTMask) and hook._tensor_name == name:
                    hook(child, ())
                    child.__dict__[READ_BY_PARENT] = child.__dict__.get(READ_BY_PARENT, 0) + 1


class ReleaseChildWeights(ComputeChildWeights):
    """Forward hook of such a parent: detach the children's weights once the parent is done."""

    def __call__(self, parent: nn.Module, args: object, output: object = None) -> None:
        for path, name in self.entries:
            child = parent.get_submodule(path)
            count = child.__dict__.get(READ_BY_PARENT, 0)
            if count:
                child.__dict__[READ_BY_PARENT] = count - 1
            weight = child.__dict__.get(name)
            if name in masked_names(child) and weight is not None and weight.requires_grad:
                setattr(child, name, weight.detach())


def attach_readers(model: nn.Module, readers: dict[str, list[tuple[str, str]]]) -> None:
    """Register the parent hooks found by `direct_readers`."""
    for parent_name, entries in readers.items():
        parent = model.get_submodule(parent_name)
        parent.register_forward_pre_hook(ComputeChildWeights(entries))
        parent.register_forward_hook(ReleaseChildWeights(entries))


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
        source = method_source(cls, name)
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
