"""How the layers that `format="shrink"` rebuilds treat tracked channels (see `dst_prune.exporting._channel_flow`).

A Linear or Conv2d (groups 1) consumes a tracked tensor only where it reads exactly its channel dimension;
BatchNorm with running statistics maps each channel's constant; a pool keeps a constant plane constant,
except an average over zero padding, where only a zero constant stays.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ._channel_layout import Layout, UnprovenError
from ._channel_ops import Tracked

__all__ = ["changes_constants", "consumed", "normalized", "pooled", "produced"]


def consumed(module: nn.Module, x: Tracked) -> int:
    """The elements per channel in the input of a Linear or Conv2d that reads `x`; `UnprovenError` where the layer does
    not read exactly the channels."""
    channels, layout = len(x.ids), x.layout
    if isinstance(module, nn.Linear):
        if layout.axis != -1:
            raise UnprovenError(f"a Linear reads the last dimension of its input, and the channels are dimension "
                                f"{layout.axis} from the end (a Linear over a spatial or sequence dimension)")
        span = layout.span if layout.span is not None else module.in_features // channels
        if channels * span != module.in_features:
            raise UnprovenError(f"its {module.in_features} inputs are not the {channels} channels times a whole number "
                                f"of elements")
        return span
    if layout.axis != -3 or layout.span != 1:
        raise UnprovenError(f"a Conv2d reads dimension -3 (C of N,C,H,W), and the channels are dimension {layout.axis} "
                            f"from the end" + (", flattened" if layout.span != 1 else ""))
    if module.in_channels != channels:
        raise UnprovenError(f"its {module.in_channels} input channels are not the {channels} tracked ones")
    return 1


def produced(module: nn.Module, ids: list[int], x: Tracked | None) -> Tracked:
    """The output of a Linear or Conv2d: its channels `ids`, each of whose constant is its bias (0 without)."""
    weight = module.weight.detach()
    values = module.bias.detach().clone() if module.bias is not None else weight.new_zeros(weight.shape[0])
    ndim = x.layout.ndim if x is not None else None
    if isinstance(module, nn.Linear):
        return Tracked(ids, values, Layout(axis=-1, ndim=ndim))
    return Tracked(ids, values, Layout(axis=-3, ndim=ndim or 4, trailing=None))  # a batched N,C,H,W map


def normalized(module: nn.BatchNorm1d | nn.BatchNorm2d, x: Tracked) -> Tracked:
    """BatchNorm in eval: an affine map per channel, where its dimension 1 is known to be the channels alone."""
    if module.running_mean is None or module.running_var is None:
        raise UnprovenError("it normalizes with batch statistics (track_running_stats=False)")
    layout = x.layout
    if isinstance(module, nn.BatchNorm2d):
        fits = layout.axis == -3 and layout.span == 1 and layout.ndim in (None, 4)
    else:  # N,C (a Linear's output of unknown rank is taken to be N,C) or N,C,L
        fits = (layout.axis == -1 and layout.ndim in (None, 2) and layout.span in (None, 1)) or \
               (layout.axis == -2 and layout.ndim == 3 and layout.span == 1)
    if not fits or module.num_features != len(x.ids):
        raise UnprovenError(f"it normalizes dimension 1 of its input, which is not known to hold the {len(x.ids)} "
                            f"channels alone")
    values = (x.values - module.running_mean) / torch.sqrt(module.running_var + module.eps)
    if module.affine:
        values = values * module.weight.detach() + module.bias.detach()
    return Tracked(x.ids, values, replace(layout, span=1))


def changes_constants(kind: str, settings: dict) -> bool:
    """Whether an average pool changes a non-zero constant plane (zero padding counted, or a divisor override)."""
    padding = settings.get("padding", 0)
    padded = settings.get("count_include_pad", False) and padding not in (0, (0, 0), [0, 0])
    return "avg" in kind.lower() and (padded or settings.get("divisor_override") is not None)


def pooled(x: Tracked, settings: dict) -> Tracked:
    """A 2-D pool over the dims after the channels: constants stay (see `changes_constants`)."""
    if x.layout.axis != -3 or x.layout.span != 1:
        raise UnprovenError("a 2-D pool reads the last two dimensions, which are not known to be the spatial dims "
                            "after the channels")
    if settings.get("return_indices"):
        raise UnprovenError("it returns indices")
    trailing = None
    if settings.get("output_size") is not None:
        size = settings["output_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        trailing = size[0] * size[1] if all(isinstance(s, int) for s in size) else None
    return replace(x, layout=replace(x.layout, trailing=trailing))
