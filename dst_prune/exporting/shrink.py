"""A physically smaller dense model from pruned output channels (`dst_prune.export(format="shrink")`).

Channel-level sparsity (`granularity="channel"`, the structure Chase trains: Yin et al. 2023, "Dynamic
Sparsity Is Channel-Level Sparsity Learner", Section 4.2; SRigL's neuron ablation: Lasby et al., ICLR 2024)
leaves output channels without a single active weight. Such a channel outputs a constant (its bias, or
0) everywhere, so it can be removed together with the inputs that consume it, once its constant is
folded into the consumer: into the bias of a Linear or an unpadded conv, or, for a zero-padded conv
(whose borders see less of the constant), into an `offset_weight` that `FoldedConv2d` applies to a
plane of ones. The outputs stay the same up to floating-point rounding.

The model is traced with `torch.fx` to find, for every layer with pruned channels, the chain that
consumes them: `Linear`/`Conv2d` -> BatchNorm, activations, dropout, pools, flatten -> `Linear`/`Conv2d`
(MLPs and plain CNNs). The model's outputs (the head) are never removed. A layer whose channels reach
anything else (a residual addition, a concatenation, a reshape, a grouped conv) is refused by name.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import DSTError

__all__ = ["FoldedConv2d", "shrink"]

logger = logging.getLogger(__name__)

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                nn.Tanh, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                nn.AlphaDropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.elu, F.dropout,
              torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}
_POOL_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_METHODS = {"relu", "sigmoid", "tanh"}


class FoldedConv2d(nn.Conv2d):
    """A zero-padded `nn.Conv2d` plus the contribution of removed input channels that were constant.

    `forward(x) = conv(x) + conv(ones, offset_weight)`: `offset_weight` `[out, 1, kh, kw]` is the sum of the
    removed input channels' kernels, each times its constant, and the plane of ones has `x`'s size, so
    the borders see exactly the part of the constant that the zero padding lets through.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:  # nn.Conv2d's arguments
        super().__init__(*args, **kwargs)
        self.register_buffer("offset_weight", self.weight.new_zeros(self.out_channels, 1, *self.kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(1, 1, *x.shape[-2:])
        return super().forward(x) + F.conv2d(ones, self.offset_weight, None, self.stride, self.padding, self.dilation)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd):
        return f"the addition {node.name!r} (a residual connection)"
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        return f"the concatenation {node.name!r}"
    return f"{node.op} {getattr(node.target, '__name__', node.target)!s} ({node.name!r})"


def _constants(step: fx.Node, module: nn.Module | None, values: torch.Tensor,
               spatial: bool) -> tuple[torch.Tensor, bool] | None:
    """The per-channel constants after `step`, and whether a constant plane stays constant; None: unsupported.

    `spatial`: the channels are dim 1 of an image batch (a conv's output), so pools, flatten and a mean over
    dims 2 and 3 keep them apart; a Linear's features (last dim) only pass elementwise steps and BatchNorm1d.
    """
    values = values.clone()  # in-place activations must not write into a bias
    if module is not None:
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if module.running_mean is None or isinstance(module, nn.BatchNorm2d) != spatial:
                return None  # batch statistics in eval are not a per-channel map
            out = (values - module.running_mean) / torch.sqrt(module.running_var + module.eps)
            return (out * module.weight + module.bias if module.affine else out), True
        if isinstance(module, _ELEMENTWISE):
            return module(values), True
        if isinstance(module, nn.Flatten) and spatial:
            return (values, True) if module.start_dim == 1 else None
        if isinstance(module, _POOLS) and spatial:
            padded = isinstance(module, nn.AvgPool2d) and module.count_include_pad and module.padding not in (0, (0, 0))
            return values, not padded
        return None
    rest = list(step.args[1:])
    if any(isinstance(a, fx.Node) for a in [*rest, *step.kwargs.values()]):
        return None
    if step.op == "call_function" and step.target in _FUNCTIONS:
        return step.target(values, *rest, **step.kwargs), True
    if step.op == "call_method" and step.target in _METHODS and not rest:
        return getattr(values, step.target)(), True
    if not spatial:
        return None
    if step.op == "call_function" and step.target in _POOL_FUNCTIONS:
        return values, True
    if (step.op, step.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = step.kwargs.get("start_dim", rest[0] if rest else 0)
        return (values, True) if start == 1 and len(rest) < 2 and "end_dim" not in step.kwargs else None
    dims = step.kwargs.get("dim", rest[0] if rest else None)
    if (step.op, step.target) in (("call_function", torch.mean), ("call_method", "mean")) and \
            isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]:
        return values, True
    return None


def _is_consumer(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op != "call_module" or not node.args or node.args[0] is not source:
        return False
    module = modules[node.target]
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)


def _follow(producer: fx.Node, values: torch.Tensor, modules: dict[str, nn.Module]) -> tuple | str | None:
    """`(steps, consumer, constants, constant_planes)` along the chain from `producer`; a str says why not;
    None: the chain reaches the model's outputs (the head, kept)."""
    node, steps, preserved = producer, [], True
    spatial = isinstance(modules[producer.target], nn.Conv2d)
    while True:
        users = list(node.users)
        if len(users) != 1:
            return f"{len(users)} consumers ({', '.join(_describe(u, modules) for u in users)})"
        user = users[0]
        if user.op == "output":
            return None
        if _is_consumer(user, node, modules):
            return steps, user, values, preserved
        module = modules[user.target] if user.op == "call_module" else None
        result = _constants(user, module, values, spatial) if user.args and user.args[0] is node else None
        if result is None:
            return _describe(user, modules)
        values, kept_constant = result
        preserved = preserved and kept_constant
        steps.append(user)
        node = user


def _plan(graph: fx.Graph, modules: dict[str, nn.Module], pruned: dict[str, torch.Tensor]) -> dict:
    """`{module name: {"out": kept rows, "in": kept inputs, "fold": [out], "offset": [out, kh, kw]}}`."""
    plan: dict[str, dict] = {}
    problems: list[str] = []
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for name, removed in pruned.items():
        producer = modules[name]
        if len(calls.get(name, [])) != 1:
            problems.append(f"{name} is called {len(calls.get(name, []))} times in the traced forward (shrink "
                            f"follows layers called once; a parent that reads its weight calls it 0 times)")
            continue
        if isinstance(producer, nn.Conv2d) and producer.groups != 1:
            problems.append(f"{name} is a grouped conv (groups={producer.groups}): its channels are tied to its inputs")
            continue
        bias = producer.bias.detach() if producer.bias is not None else producer.weight.new_zeros(len(removed))
        chain = _follow(calls[name][0], bias, modules)
        if chain is None:
            logger.info("shrink export: %s feeds the model's outputs: its %d pruned channels are kept", name,
                        int(removed.sum()))
            continue
        if isinstance(chain, str):
            problems.append(f"{name} ({int(removed.sum())} pruned channels) feeds {chain}")
            continue
        steps, consumer_node, constants, preserved = chain
        if not preserved:  # a padded average pool: only channels that are exactly 0 can go
            removed = removed & (constants == 0)
            if not bool(removed.any()):
                logger.info("shrink export: %s keeps its pruned channels: their constant output passes a padded "
                            "average pool, which changes it at the borders", name)
                continue
        if bool(removed.all()):
            removed = removed.clone()
            removed[0] = False  # keep one channel: no layer of width 0
        keep = torch.nonzero(~removed, as_tuple=True)[0]
        gone = torch.nonzero(removed, as_tuple=True)[0]
        plan.setdefault(name, {})["out"] = keep
        for step in steps:
            if step.op == "call_module" and isinstance(modules[step.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
                plan.setdefault(step.target, {})["keep"] = keep
        consumer = modules[consumer_node.target]
        entry = plan.setdefault(consumer_node.target, {})
        weight = consumer.weight.detach()
        a = constants[gone].to(weight.dtype)
        if isinstance(consumer, nn.Linear):
            span = consumer.in_features // len(removed)
            if span * len(removed) != consumer.in_features:
                problems.append(f"{name}: its {len(removed)} channels do not divide the {consumer.in_features} inputs "
                                f"of {consumer_node.target}")
                continue
            columns = torch.arange(consumer.in_features, device=weight.device).view(len(removed), span)
            entry["in"] = columns[keep].reshape(-1)
            entry["fold"] = (weight[:, columns[gone].reshape(-1)].view(-1, len(gone), span).sum(-1) * a).sum(-1)
            continue
        entry["in"] = keep
        offset = torch.einsum("oikl,i->okl", weight[:, gone], a)
        if consumer.padding_mode != "zeros" or consumer.padding in ((0, 0), "valid"):
            entry["fold"] = offset.sum((1, 2))  # a constant plane stays constant: a bias
        else:
            entry["offset"] = offset
    if problems:
        more = f" and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise DSTError("format='shrink' cannot remove the pruned channels of: " + "; ".join(problems[:6]) + more
                       + ". It shrinks chains Linear/Conv2d -> BatchNorm/activation/dropout/pool/flatten -> "
                       "Linear/Conv2d (MLPs and plain CNNs); residual additions and concatenations tie channels "
                       "across layers. Keep those layers dense while training (exclude=[...]), or export with "
                       "format='dense' or 'condensed'.")
    return plan


def _rebuilt(module: nn.Module, entry: dict) -> nn.Module:
    """A new, smaller copy of `module` following its `plan` entry."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        keep = entry["keep"]
        new = type(module)(len(keep), module.eps, module.momentum, module.affine, module.track_running_stats,
                           device=module.running_mean.device, dtype=module.running_mean.dtype)
        with torch.no_grad():
            for key, tensor in module.state_dict().items():
                getattr(new, key).copy_(tensor if tensor.ndim == 0 else tensor[keep])
        return new.train(module.training).requires_grad_(False)
    weight = module.weight.detach()
    out = entry.get("out", torch.arange(weight.shape[0], device=weight.device))
    inputs = entry.get("in", torch.arange(weight.shape[1], device=weight.device))
    bias = module.bias.detach().clone() if module.bias is not None else None
    if "fold" in entry:
        bias = entry["fold"] if bias is None else bias + entry["fold"]
    factory = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(module, nn.Linear):
        new = nn.Linear(len(inputs), len(out), bias=bias is not None, **factory)
    else:
        cls = FoldedConv2d if "offset" in entry else nn.Conv2d
        new = cls(len(inputs), len(out), module.kernel_size, module.stride, module.padding, module.dilation, 1,
                  bias is not None, module.padding_mode, **factory)
        if "offset" in entry:
            new.offset_weight.copy_(entry["offset"][out].unsqueeze(1))
    with torch.no_grad():
        new.weight.copy_(weight[out][:, inputs])
        if bias is not None:
            new.bias.copy_(bias[out])
    return new.train(module.training).requires_grad_(False)


def shrink(exported: nn.Module, pruned: dict[str, torch.Tensor]) -> nn.Module:
    """Remove the pruned output channels of the layers in `exported` (a masks-removed copy), in place.

    Args:
        exported: the model to shrink; its modules are replaced by smaller ones.
        pruned: `{layer name: bool [out_channels], True where the channel has no active weight}`.

    Raises:
        DSTError: the model cannot be traced, or a layer's pruned channels reach something shrink cannot
            follow (named in the message).
    """
    try:
        graph = fx.Tracer().trace(exported)
    except Exception as error:  # fx raises many types; the message says which
        raise DSTError(f"format='shrink' traces the model with torch.fx to find which layers consume which channels, "
                       f"and tracing {type(exported).__name__} failed ({type(error).__name__}: {error}). Shrink "
                       f"supports MLPs and plain CNNs; use format='dense' or 'condensed'.") from error
    modules = dict(exported.named_modules())
    plan = _plan(graph, modules, pruned)
    if not plan:
        raise DSTError(f"format='shrink' found no channel to remove: the layers with pruned channels "
                       f"({', '.join(pruned)}) feed the model's outputs, which are never removed. Use format='dense'.")
    for name, entry in plan.items():
        parent_name, _, child = name.rpartition(".")
        setattr(exported.get_submodule(parent_name), child, _rebuilt(modules[name], entry))
        logger.info("shrink export: %s %s", name, " ".join(f"{k}={len(v)}" for k, v in entry.items()
                                                          if k in ("out", "in", "keep")))
    return exported
