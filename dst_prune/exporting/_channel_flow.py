"""Which output channels of which layers meet where: the graph analysis behind `format="shrink"`.

Every output channel of an `nn.Linear` or `nn.Conv2d` (groups 1) gets an id, once per layer however often it
is called. The traced graph is walked in order; for every tensor derived from such outputs the walk knows, per
position along the channel dimension (`channel_layout.Layout`), which id it carries and the constant it
would hold if that channel were pruned (its bias, mapped through every step since). An operation is followed
only where the walk proves that it keeps channels apart and knows where they go: elementwise functions,
BatchNorm with running statistics, pools, flatten, permute/transpose, a mean over other dims, arithmetic of
two tracked tensors, concatenation, and a Linear or Conv2d reading exactly the channel dimension.

Ids that meet are joined in a union-find: channels added, multiplied or concatenated along another dimension,
and the positions of one layer's input seen by its several calls. A class of ids can be removed only if every
id in it is a pruned channel. Every other use pins the ids it reads, with a kind:

- `REFUSE`: an operation the walk cannot prove keeps channels apart (an unknown layer or function, a
  reshape, a Linear over a non-channel dimension, a grouped convolution): removing would change what it reads;
- `TIE`: an operation it understands that mixes the channels with values that are not constant (a tensor
  it does not track, a layer also called on such a tensor, calls whose constants differ);
- `OUTPUT`: the model's outputs, which are never changed;
- `BORDER`: a padded average pool, through which only a zero constant stays constant.

A tensor computed from channels the walk could not follow is remembered as such, so that an addition of
tracked channels to it refuses too, instead of hiding the cause behind a tie.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx, nn

from . import _channel_ops as ops
from ._channel_classes import ChannelClasses
from ._channel_layers import changes_constants, consumed, normalized, pooled, produced
from ._channel_layout import Layout, UnprovenError
from ._channel_ops import BORDER, OUTPUT, REFUSE, TIE, Call, Tracked, arguments, describe, nodes, op_name

__all__ = ["ChannelFlow"]


class ChannelFlow(ChannelClasses):
    """The channels of every Linear/Conv2d of a traced graph: their classes, pins and the layers' calls
    (`ChannelClasses`), found by walking the graph once.

    Attributes:
        opaque: layers that cannot be rebuilt, with why.

    Args:
        graph: the `torch.fx` graph of the model (in eval mode).
        modules: `dict(model.named_modules())`.
        pruned: `{layer name: bool [out_channels]}`, True at the channels without an active weight.
    """

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], pruned: dict[str, torch.Tensor]) -> None:
        super().__init__(modules, pruned)
        self.opaque = ops.opaque_layers(graph, modules)
        self._env: dict[fx.Node, Tracked] = {}
        self._aliases: dict[fx.Node, fx.Node] = {}  # a tracked result that may share memory with its input -> input
        self._shapes: dict[fx.Node, fx.Node] = {}  # `x.shape` / `x.size()` -> x
        self._dims: dict[fx.Node, tuple[fx.Node, int]] = {}  # `x.size(d)` -> (x, d from the end)
        for node in graph.nodes:
            self._visit(node)
        self.join_calls()

    # --- the walk -----------------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        args = nodes((node.args, node.kwargs))
        inputs = [a for a in dict.fromkeys(args) if a in self._env]
        for shape in (a for a in args if a in self._shapes):
            if not (op_name(node) == "getitem" and node.args[0] is shape and isinstance(node.args[1], int)):
                self.pin(self._env[self._shapes[shape]].ids, REFUSE,
                         f"{describe(node, self.modules)}: it reads the whole shape, channels included")
                self._unfollowed[node] = describe(node, self.modules)
        try:
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if first in self._env and ops.in_place(node, self.modules) and self._read_elsewhere(first):
                raise UnprovenError(f"it writes in place into {first.name!r}, which other operations read")
            result = self._transfer(node, inputs)
        except UnprovenError as why:
            for a in inputs:
                self.pin(self._env[a].ids, REFUSE, f"{describe(node, self.modules)}: {why}")
            result = None
            if inputs:
                self._unfollowed[node] = describe(node, self.modules)
        if result is None and node not in self._unfollowed:
            origin = next((self._unfollowed[a] for a in args if a in self._unfollowed), None)
            if origin is not None:
                self._unfollowed[node] = origin
        if result is not None:
            self._env[node] = result
            if ops.makes_alias(node, self.modules):
                self._aliases[node] = node.args[0]

    def _read_elsewhere(self, node: fx.Node) -> bool:
        """Whether a write into `node` is seen by another operation: `node`, or a tensor it is a view of, has
        another user."""
        while True:
            if len(node.users) > 1:
                return True
            if node not in self._aliases:
                return False
            node = self._aliases[node]

    def _transfer(self, node: fx.Node, inputs: list[fx.Node]) -> Tracked | None:
        if node.op == "output":
            for a in inputs:
                self.pin(self._env[a].ids, OUTPUT, "they reach the model's outputs, which are never changed")
            return None
        if node.op == "call_module":
            return self._module(node, inputs)
        name = op_name(node)
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if name == "getitem" and first in self._shapes:
            return self._read_dim(node, self._shapes[first], node.args[1])
        if not inputs:
            return None
        x = self._env.get(first)
        if name in ("getattr", "size", "dim"):
            return self._metadata(node, name)
        if node.target in ops.BINARY or name in ops.BINARY_METHODS:
            return self._binary(node)
        if name == "cat":
            return self._cat(node)
        if x is None or len(inputs) > 1:
            raise UnprovenError("it takes the channels in an argument other than its input")
        if node.target in ops.UNARY or name in ops.UNARY_METHODS:
            rest = node.args[1:]
            if nodes((rest, node.kwargs)):
                raise UnprovenError("an argument is computed in the forward")
            function = node.target if node.op == "call_function" else getattr(torch.Tensor, name)
            return replace(x, values=function(x.values.clone(), *rest, **node.kwargs))
        if node.target in ops.DROPOUT:
            if ops.python_arguments(node).get("training", True):
                raise UnprovenError("dropout in training mode")
            return x
        return self._reshaped(node, x, name)

    def _reshaped(self, node: fx.Node, x: Tracked, name: str | None) -> Tracked:
        layout = x.layout
        if name == "flatten":
            bound = arguments(node, name)
            return replace(x, layout=layout.flatten(bound["start_dim"], bound["end_dim"]))
        if name in ("view", "reshape"):
            return replace(x, layout=self._view(node, x))
        if name == "permute":
            dims = node.kwargs.get("dims", node.args[1:])
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            if not all(isinstance(d, int) for d in dims):
                raise UnprovenError("its dimensions are computed in the forward")
            return replace(x, layout=layout.permute(dims))
        if name in ("transpose", "squeeze", "unsqueeze"):
            bound = arguments(node, name)
            if not all(isinstance(v, int) for v in bound.values()):
                raise UnprovenError(f"{name} without an explicit dimension")
            return replace(x, layout=getattr(layout, name)(*bound.values()))
        if name in ("mean", "amax"):
            bound = arguments(node, name)
            dims = [bound["dim"]] if isinstance(bound["dim"], int) else bound["dim"]
            if not dims or bound.get("dtype") is not None:
                raise UnprovenError(f"a {name} over every dimension, channels included")
            return replace(x, layout=layout.reduce(dims, bool(bound["keepdim"])))
        if name in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"):
            return self._pool(node, x, name, arguments(node, name))
        raise UnprovenError("shrink cannot prove that it keeps channels apart")

    def _view(self, node: fx.Node, x: Tracked) -> Layout:
        """`x.view(x.size(0), ..., x.size(k - 1), -1)`: a flatten from dim k; any other view is not followed."""
        shape = node.kwargs.get("shape", node.kwargs.get("size", node.args[1:]))
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        ndim, leading = x.layout.ndim, list(shape[:-1])
        if ndim is None or not shape or shape[-1] != -1 or not all(isinstance(d, fx.Node) and self._dims.get(d) == (
                node.args[0], i - ndim) for i, d in enumerate(leading)):
            raise UnprovenError("it reshapes the channels (shrink follows x.view(x.size(0), -1) and flatten)")
        return x.layout.flatten(len(leading), -1)

    def _metadata(self, node: fx.Node, name: str) -> None:
        if name == "dim" or (name == "getattr" and node.args[1] in ops.METADATA):
            return None
        if (name == "getattr" and node.args[1] == "shape") or (name == "size" and len(node.args) == 1
                                                                and not node.kwargs):
            self._shapes[node] = node.args[0]
            return None
        if name == "size":
            return self._read_dim(node, node.args[0], arguments(node, "size")["dim"])
        raise UnprovenError(f"it reads the attribute {node.args[1]!r}")

    def _read_dim(self, node: fx.Node, source: fx.Node, dim: object) -> None:
        layout = self._env[source].layout
        try:
            if not isinstance(dim, int):
                raise UnprovenError("it reads a slice of the shape")
            relative = layout.relative(dim)
            if relative == layout.axis:
                raise UnprovenError("it reads the number of channels, which shrink changes")
        except UnprovenError as why:
            self.pin(self._env[source].ids, REFUSE, f"{describe(node, self.modules)}: {why}")
            self._unfollowed[node] = describe(node, self.modules)
            return None
        self._dims[node] = (source, relative)
        return None

    def _binary(self, node: fx.Node) -> Tracked | None:
        if len(node.args) != 2 or nodes(node.kwargs):
            raise UnprovenError("it is called with arguments shrink does not follow")
        a, b = (self._env.get(v, v) if isinstance(v, fx.Node) else v for v in node.args)
        tracked = [v for v in (a, b) if isinstance(v, Tracked)]
        other = next((v for v in (a, b) if isinstance(v, fx.Node)), None)
        if other is not None:  # a tensor without tracked channels
            for t in tracked:
                self.tie_or_refuse(t.ids, other, f"{describe(node, self.modules)} combines them with")
            return None
        values = [v.values if isinstance(v, Tracked) else v for v in (a, b)]
        function = ops.OUT_OF_PLACE.get(node.target, node.target) if node.op == "call_function" else \
            getattr(torch.Tensor, node.target.rstrip("_"))
        if len(tracked) == 1:
            return replace(tracked[0], values=function(*values, **node.kwargs))
        if len(a.ids) != len(b.ids):
            raise UnprovenError(f"it combines {len(a.ids)} channels with {len(b.ids)}")
        layout = a.layout.merge(b.layout)
        for i, j in zip(a.ids, b.ids):
            self.union(i, j, describe(node, self.modules))
        return Tracked(a.ids, function(*values, **node.kwargs), layout)

    def _cat(self, node: fx.Node) -> Tracked | None:
        tensors = node.kwargs.get("tensors", node.args[0] if node.args else ())
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        parts = [self._env.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        why = describe(node, self.modules)
        if None in parts:
            other = next((t for t, p in zip(tensors, parts) if p is None and isinstance(t, fx.Node)), None)
            for part in (p for p in parts if p is not None):
                if other is None:
                    raise UnprovenError("it joins them with a value that is not a tensor")
                self.tie_or_refuse(part.ids, other, f"{why} joins them with")
            return None
        layout = parts[0].layout
        for part in parts[1:]:
            layout = layout.merge(part.layout)
        if not isinstance(dim, int):
            raise UnprovenError("its dimension is computed in the forward")
        if layout.relative(dim) == layout.axis:
            if any(p.layout.span is None for p in parts):
                raise UnprovenError("it joins flattened channels whose number of elements is not known")
            return Tracked([i for p in parts for i in p.ids], torch.cat([p.values for p in parts]), layout)
        if len({len(p.ids) for p in parts}) != 1:
            raise UnprovenError("it joins tensors with different numbers of channels along another dimension")
        for part in parts[1:]:
            for i, j in zip(parts[0].ids, part.ids):
                self.union(i, j, why)
            differ = torch.nonzero(part.values != parts[0].values).flatten().tolist()
            self.pin([ids[k] for k in differ for ids in (parts[0].ids, part.ids)], TIE,
                     f"{why} joins constants that differ, which is not a constant")
        if layout.relative(dim) > layout.axis:
            layout = replace(layout, trailing=None)
        return Tracked(parts[0].ids, parts[0].values, layout)

    # --- layers -------------------------------------------------------------------------------------
    def _module(self, node: fx.Node, inputs: list[fx.Node]) -> Tracked | None:
        name, module = node.target, self.modules[node.target]
        x = self._env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        kind = type(module)
        known = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, *ops.ELEMENTWISE, *ops.POOLS)
        if inputs and kind not in known:
            raise UnprovenError("shrink cannot prove that this layer keeps channels apart")
        if len(inputs) > (x is not None) or (x is not None and (len(node.args) > 1 or node.kwargs)):
            raise UnprovenError("it takes the channels with other arguments")
        if name in self.opaque:
            if inputs:
                raise UnprovenError(self.opaque[name])
            return None
        if kind is nn.Linear or (kind is nn.Conv2d and module.groups == 1) or kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            return self._rebuildable(node, name, module, x)
        if x is None:
            return None
        if isinstance(module, nn.Conv2d):
            raise UnprovenError(f"a grouped convolution (groups={module.groups}) ties its input channels to its groups")
        if kind in ops.ELEMENTWISE:
            return replace(x, values=module(x.values.clone()))
        if kind is nn.Flatten:
            return replace(x, layout=x.layout.flatten(module.start_dim, module.end_dim))
        settings = {k: getattr(module, k) for k in ("output_size", "padding", "count_include_pad", "divisor_override",
                                                    "return_indices") if hasattr(module, k)}
        return self._pool(node, x, kind.__name__, settings)

    def _rebuildable(self, node: fx.Node, name: str, module: nn.Module, x: Tracked | None) -> Tracked | None:
        """A Linear, Conv2d or BatchNorm call: recorded (a call that cannot be followed as untracked, so that the
        layer's other calls keep their channels too)."""
        batchnorm = isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))
        try:
            span = 1 if x is None or batchnorm else consumed(module, x)
            out = normalized(module, x) if batchnorm and x is not None else None
        except UnprovenError:
            self.calls.setdefault(name, []).append(Call(node, None))
            raise
        self.calls.setdefault(name, []).append(Call(node, x, span))
        if batchnorm:
            return out
        return produced(module, self.channels_of(name, module.weight.shape[0]), x)

    def _pool(self, node: fx.Node, x: Tracked, kind: str, settings: dict) -> Tracked:
        out = pooled(x, settings)
        if changes_constants(kind, settings):
            self.pin([i for i, v in zip(x.ids, x.values.tolist()) if v != 0], BORDER,
                     f"{describe(node, self.modules)} averages over zero padding, which changes a non-zero constant "
                     f"at the borders")
        return out
