"""The vocabulary of the channel analysis behind `format="shrink"`: which graph operations it follows, and how
it reads their arguments (see `dst_prune.exporting._channel_flow`)."""

from __future__ import annotations

import inspect
import itertools
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from ._channel_layout import Layout, UnprovenError

__all__ = ["BORDER", "OUTPUT", "REFUSE", "TIE", "Call", "Tracked", "arguments", "describe", "in_place", "makes_alias",
           "nodes", "op_name", "opaque_layers"]

REFUSE, TIE, OUTPUT, BORDER = "refuse", "tie", "output", "border"

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
               nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d,
               nn.Dropout2d, nn.AlphaDropout)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
UNARY = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.elu, F.mish,
         F.softplus, F.hardtanh, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}
DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}
UNARY_METHODS = {"relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_", "contiguous", "clone", "detach"}
BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
          operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                operator.itruediv: operator.truediv}
METADATA = {"dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_ALIASES = {"flatten", "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "detach"}
_NAMED = {torch.flatten: "flatten", torch.mean: "mean", torch.amax: "amax", torch.permute: "permute",
          torch.transpose: "transpose", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
          torch.reshape: "reshape", torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
          F.max_pool2d: "max_pool2d", torch.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d",
          F.adaptive_avg_pool2d: "adaptive_avg_pool2d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
          getattr: "getattr", operator.getitem: "getitem"}
_SIGNATURES = {"flatten": ("start_dim", "end_dim"), "mean": ("dim", "keepdim", "dtype"), "amax": ("dim", "keepdim"),
               "transpose": ("dim0", "dim1"), "squeeze": ("dim",), "unsqueeze": ("dim",), "size": ("dim",),
               "max_pool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
               "avg_pool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
               "adaptive_avg_pool2d": ("output_size",), "adaptive_max_pool2d": ("output_size", "return_indices")}
_DEFAULTS = {"start_dim": 0, "end_dim": -1, "keepdim": False, "padding": 0, "count_include_pad": True}


@dataclass
class Tracked:
    """A tensor carrying tracked channels: their ids (one per position along `layout.axis`), the constant each
    would hold if it were pruned, and where they are."""

    ids: list[int]
    values: torch.Tensor
    layout: Layout


@dataclass
class Call:
    """One call of a layer with per-channel parameters: its input (None: untracked) and the elements per channel."""

    node: fx.Node
    input: Tracked | None
    span: int = 1


def op_name(node: fx.Node) -> str | None:
    """A method's name, or the name under which a known function is handled."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        try:
            return _NAMED.get(node.target)
        except TypeError:  # an unhashable target
            return None
    return None


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A short, readable name for a graph node."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "output":
        return "the model's outputs"
    if node.target in (operator.add, operator.iadd, torch.add, "add", "add_"):
        return f"the addition {node.name!r}"
    if op_name(node) == "cat":
        return f"the concatenation {node.name!r}"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op.replace('call_', '')} {target} ({node.name!r})"


def nodes(value: object) -> list[fx.Node]:
    """The graph nodes in a (nested) argument."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def arguments(node: fx.Node, name: str) -> dict:
    """The arguments after the input, by name (see `_SIGNATURES`); `UnprovenError` for anything else."""
    names = _SIGNATURES[name]
    extra = node.args[1:]
    if len(extra) > len(names) or set(node.kwargs) - set(names):
        raise UnprovenError(f"it is called with arguments shrink does not follow ({node.args[1:]}, {node.kwargs})")
    bound = {**{n: _DEFAULTS.get(n) for n in names}, **dict(zip(names, extra)), **node.kwargs}
    if nodes(list(bound.values())):
        raise UnprovenError("an argument is computed in the forward")
    return bound


def python_arguments(node: fx.Node) -> dict:
    """The bound arguments of a Python function (F.relu, F.dropout); empty where there is no signature."""
    try:
        return inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):
        return {}


def in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` writes into its first argument."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        return node.target in OUT_OF_PLACE or python_arguments(node).get("inplace") is True
    return False


def makes_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the result of `node` may share memory with its input (a view, an identity, an in-place op)."""
    if node.op == "call_module":
        return type(modules[node.target]) in (nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                              nn.AlphaDropout) or in_place(node, modules)
    return op_name(node) in _ALIASES or node.target in DROPOUT or in_place(node, modules)


def opaque_layers(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Layers that cannot be rebuilt, with why: their tensors are shared with another layer or read directly."""
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        for tensor in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            owners.setdefault(id(tensor), []).append(name)
    reasons = {}
    for names in (n for n in owners.values() if len(n) > 1):
        for name in names:
            reasons[name] = f"its tensors are shared with {', '.join(n for n in names if n != name)}"
    for node in graph.nodes:
        owner = node.target.rpartition(".")[0] if node.op == "get_attr" else None
        if owner is not None and owner in modules and owner not in reasons:
            reasons[owner] = f"the forward reads its tensor {node.target} directly"
    return reasons
