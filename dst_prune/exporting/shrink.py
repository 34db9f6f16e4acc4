"""A physically smaller dense model from pruned output channels (`dst_prune.export(format="shrink")`).

Channel-level sparsity (`granularity="channel"`, the structure Chase trains: Yin et al. 2023, "Dynamic
Sparsity Is Channel-Level Sparsity Learner", Section 4.2; SRigL's neuron ablation: Lasby et al., ICLR 2024)
leaves output channels without a single active weight. Such a channel outputs a constant (its bias, or
0) everywhere, so it can be removed together with the inputs that consume it, once its constant is
folded into the consumer: into the bias of a Linear or an unpadded conv, or, for a zero-padded conv
(whose borders see less of the constant), into an `offset_weight` that `FoldedConv2d` applies to a
plane of ones. The outputs stay the same up to floating-point rounding.

Which channels can go is decided on the model's `torch.fx` graph by `dst_prune.exporting._channel_flow`: a channel is
removed only where every operation that reads it provably keeps channels apart, and every channel it meets
(an addition, a concatenation, a layer called on several inputs) is removed too. Channels tied to ones
that stay, or reaching the model's outputs, are kept (logged); channels that reach an operation the
analysis cannot follow make the export fail with a `DSTError` naming the layer and the operation.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import DSTError
from ._channel_flow import ChannelFlow
from ._channel_ops import REFUSE, TIE

__all__ = ["FoldedConv2d", "shrink"]

logger = logging.getLogger(__name__)


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


def _untracked(name: str, module: nn.Module, flow: ChannelFlow) -> str:
    """Why a layer with pruned channels got no channel ids."""
    if name in flow.opaque:
        return flow.opaque[name]
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"it is a grouped convolution (groups={module.groups}), whose output channels are tied to its groups"
    return "it is not called as a layer in the traced forward (a parent reads its weight)"


def _decide(flow: ChannelFlow, modules: dict[str, nn.Module],
            pruned: dict[str, torch.Tensor]) -> tuple[set[int], Counter, Counter]:
    """The removable classes (their roots), the refusals `{(layer, why): channels}` and the kept channels
    `{(layer, log level, why): channels}`."""
    members: dict[int, list[int]] = {}
    for i in range(len(flow.parent)):
        members.setdefault(flow.find(i), []).append(i)
    removable, refused, kept = set(), Counter(), Counter()
    for root, ids in members.items():
        gone = [i for i in ids if flow.is_pruned[i]]
        if not gone:
            continue
        pins = [pin for i in ids for pin in flow.pins.get(i, ())]
        active = sorted({flow.owner[i][0] for i in ids if not flow.is_pruned[i]})
        keeping = [pin for pin in pins if pin[0] != REFUSE]
        if active:  # tied to channels that stay: kept, whatever else reads them
            tie = next((flow.ties[i] for i in gone if i in flow.ties), "an operation")
            level, why = logging.WARNING, f"{tie} ties them to channels of {', '.join(active[:3])} that stay active"
        elif keeping:  # kept anyway: what reads them sees them unchanged
            level = logging.WARNING if keeping[0][0] == TIE else logging.INFO
            why = keeping[0][1]
        elif pins:  # removable but for an operation that cannot be followed
            for i in gone:
                refused[flow.owner[i][0], pins[0][1]] += 1
            continue
        else:
            removable.add(root)
            continue
        for i in gone:
            kept[flow.owner[i][0], level, why] += 1
    for name, ids in flow.producers.items():  # no layer of width 0
        if {flow.find(i) for i in ids} <= removable:
            removable.discard(flow.find(ids[0]))
            kept[name, logging.INFO, "one channel stays, so that no layer has width 0"] += 1
    for name in pruned.keys() - flow.producers.keys():
        kept[name, logging.WARNING, _untracked(name, modules[name], flow)] += int(pruned[name].sum())
    return removable, refused, kept


def _refuse(refused: Counter) -> None:
    layers = list(dict.fromkeys(layer for layer, _ in refused))
    problems = [f"{layer} ({count} pruned channels) reaches {why}" for (layer, why), count in refused.items()]
    more = f" and {len(problems) - 6} more" if len(problems) > 6 else ""
    raise DSTError("format='shrink' cannot remove the pruned channels of: " + "; ".join(problems[:6]) + more
                   + ". Shrink removes a channel only where every operation that reads it provably keeps channels "
                   "apart (elementwise functions, BatchNorm, pools, flatten, permutes, additions, concatenations, "
                   "and a Linear or Conv2d reading exactly the channel dimension; see docs/export.md). Keep those "
                   f"layers dense while training (exclude={[f'{layer}.weight' for layer in layers[:4]]}), or export "
                   "with format='dense' or 'condensed'.")


def _plan(flow: ChannelFlow, modules: dict[str, nn.Module], removable: set[int]) -> dict[str, dict]:
    """`{module name: {"out": kept rows, "in": kept inputs, "fold": [out], "offset": [out, kh, kw], "keep": ...}}`."""
    gone = torch.tensor([flow.find(i) in removable for i in range(len(flow.parent))], dtype=torch.bool)
    plan: dict[str, dict] = {}
    for name, ids in flow.producers.items():
        if bool(gone[ids].any()):
            plan[name] = {"out": torch.nonzero(~gone[ids]).flatten()}
    for name, calls in flow.calls.items():
        call = next((c for c in calls if c.input is not None), None)
        if call is None or not bool(gone[call.input.ids].any()):
            continue
        module, removed = modules[name], gone[call.input.ids]
        entry = plan.setdefault(name, {})
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            entry["keep"] = torch.nonzero(~removed).flatten()
            continue
        weight = module.weight.detach()
        removed = removed.to(weight.device)
        values = call.input.values.to(weight.device, weight.dtype)
        if isinstance(module, nn.Linear):
            columns = removed.repeat_interleave(call.span)
            entry["in"] = torch.nonzero(~columns).flatten()
            entry["fold"] = weight[:, columns] @ values.repeat_interleave(call.span)[columns]
            continue
        entry["in"] = torch.nonzero(~removed).flatten()
        offset = torch.einsum("oikl,i->okl", weight[:, removed], values[removed])
        if module.padding_mode != "zeros" or module.padding in ((0, 0), "valid"):
            entry["fold"] = offset.sum((1, 2))  # a constant plane stays constant: a bias
        else:
            entry["offset"] = offset
    return plan


def _rebuilt(module: nn.Module, entry: dict) -> nn.Module:
    """A new, smaller copy of `module` following its `plan` entry."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        keep = entry["keep"].to(module.running_mean.device)
        new = type(module)(len(keep), module.eps, module.momentum, module.affine, module.track_running_stats,
                           device=module.running_mean.device, dtype=module.running_mean.dtype)
        with torch.no_grad():
            for key, tensor in module.state_dict().items():
                getattr(new, key).copy_(tensor if tensor.ndim == 0 else tensor[keep])
        return new.train(module.training).requires_grad_(False)
    weight = module.weight.detach()
    out = entry.get("out", torch.arange(weight.shape[0])).to(weight.device)
    inputs = entry.get("in", torch.arange(weight.shape[1])).to(weight.device)
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


def _kept_by_layer(kept: Counter, level: int | None = None) -> dict[str, str]:
    """`{layer: "N pruned channels stay (n: why; ...)"}` for the kept channels logged at `level` (None: all)."""
    reasons: dict[str, list[tuple[int, str]]] = {}
    for (layer, lvl, why), count in kept.items():
        if level is None or lvl == level:
            reasons.setdefault(layer, []).append((count, why))
    return {layer: f"{sum(c for c, _ in entries)} pruned channels stay ("
                   + "; ".join(f"{c}: {why}" for c, why in entries) + ")" for layer, entries in reasons.items()}


def _log_kept(kept: Counter) -> None:
    for level in (logging.WARNING, logging.INFO):
        lines = [f"{layer}: {text}" for layer, text in _kept_by_layer(kept, level).items()]
        if lines:
            logger.log(level, "shrink export keeps pruned channels of %d layers: %s", len(lines), "; ".join(lines))


def shrink(exported: nn.Module, pruned: dict[str, torch.Tensor]) -> nn.Module:
    """Remove the pruned output channels of the layers in `exported` (a masks-removed copy), in place.

    Everything is decided and every new layer built before the first one is swapped in, so a refusal leaves
    `exported` as it was.

    Args:
        exported: the model to shrink; its modules are replaced by smaller ones.
        pruned: `{layer name: bool [out_channels], True where the channel has no active weight}`.

    Raises:
        DSTError: the model cannot be traced, a layer's pruned channels reach an operation that shrink cannot
            prove keeps channels apart (named in the message), or no channel can be removed.
    """
    try:
        graph = fx.Tracer().trace(exported)
    except Exception as error:  # fx raises many types; the message says which
        raise DSTError(f"format='shrink' traces the model with torch.fx to find which layers consume which channels, "
                       f"and tracing {type(exported).__name__} failed ({type(error).__name__}: {error}). Use "
                       f"format='dense' or 'condensed', or make the forward traceable (no data-dependent control "
                       f"flow).") from error
    modules = dict(exported.named_modules())
    flow = ChannelFlow(graph, modules, pruned)
    removable, refused, kept = _decide(flow, modules, pruned)
    if refused:
        _refuse(refused)
    plan = _plan(flow, modules, removable)
    if not plan:
        layers = _kept_by_layer(kept)
        more = f"; and {len(layers) - 4} more layers" if len(layers) > 4 else ""
        raise DSTError("format='shrink' found no channel to remove: " + "; ".join(
            f"{layer}: {text}" for layer, text in list(layers.items())[:4]) + f"{more}. Use format='dense'.")
    _log_kept(kept)
    rebuilt = {name: _rebuilt(modules[name], entry) for name, entry in plan.items()}
    names = {}
    for name, module in exported.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    for name, new in rebuilt.items():
        for alias in names[id(modules[name])]:
            parent_name, _, child = alias.rpartition(".")
            setattr(exported.get_submodule(parent_name), child, new)
        logger.info("shrink export: %s %s", name, " ".join(f"{k}={len(v)}" for k, v in plan[name].items()
                                                          if k in ("out", "in", "keep")))
    return exported
