"""Classes of channel ids for `format="shrink"`: which output channels must go or stay together.

`ChannelClasses` is the bookkeeping of `_channel_flow.ChannelFlow`: one id per output channel of every
rebuildable layer, a union-find joining the ids that meet, the pins that keep or refuse them, and the calls of
every layer with per-channel parameters.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ._channel_ops import REFUSE, TIE, Call

__all__ = ["ChannelClasses"]


class ChannelClasses:
    """Channel ids, their classes and pins.

    Attributes:
        parent: the union-find over channel ids (`find` gives a class's root).
        owner / is_pruned: per id, `(layer, channel)` and whether it has no active weight.
        pins: per id, `[(kind, why)]`; ties: per id, the operation that first joined it to another.
        producers: per layer, its output ids; calls: per Linear, Conv2d or BatchNorm, its calls.

    Args:
        modules: `dict(model.named_modules())`.
        pruned: `{layer name: bool [out_channels]}`, True at the channels without an active weight.
    """

    def __init__(self, modules: dict[str, nn.Module], pruned: dict[str, torch.Tensor]) -> None:
        self.modules, self.pruned = modules, pruned
        self.parent: list[int] = []
        self.owner: list[tuple[str, int]] = []
        self.is_pruned: list[bool] = []
        self.pins: dict[int, list[tuple[str, str]]] = {}
        self.ties: dict[int, str] = {}
        self.producers: dict[str, list[int]] = {}
        self.calls: dict[str, list[Call]] = {}
        self._unfollowed: dict[fx.Node, str] = {}  # untracked results computed from channels it could not follow

    def channels_of(self, name: str, count: int) -> list[int]:
        """The ids of the `count` output channels of layer `name`, the same for every call."""
        if name not in self.producers:
            flags = self.pruned.get(name, torch.zeros(count, dtype=torch.bool)).tolist()
            ids = list(range(len(self.parent), len(self.parent) + len(flags)))
            self.parent += ids
            self.owner += [(name, k) for k in range(len(flags))]
            self.is_pruned += flags
            self.producers[name] = ids
        return self.producers[name]

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.ties.setdefault(a, why)
            self.ties.setdefault(b, why)

    def pin(self, ids: list[int], kind: str, why: str) -> None:
        for i in ids:
            self.pins.setdefault(i, []).append((kind, why))

    def tie_or_refuse(self, ids: list[int], other: fx.Node, why: str) -> None:
        """Pin `ids`, which `why` mixes with the untracked tensor `other`: a tie, or a refusal where `other` was
        computed from channels the walk could not follow (keeping them would hide that)."""
        if other in self._unfollowed:
            self.pin(ids, REFUSE, f"{why} (the result of {self._unfollowed[other]}, which shrink cannot follow)")
        else:
            self.pin(ids, TIE, f"{why} a tensor whose channels shrink does not track")

    def join_calls(self) -> None:
        """A layer called several times is rebuilt once: the positions of its input join across the calls, and a
        Linear or Conv2d folds one set of constants, so where the calls' constants differ they stay."""
        for name, calls in self.calls.items():
            tracked = [c for c in calls if c.input is not None]
            if not tracked:
                continue
            if len(tracked) < len(calls):
                other = next(c for c in calls if c.input is None).node.args[0]
                for call in tracked:
                    self.tie_or_refuse(call.input.ids, other, f"{name} is also called on")
                continue
            first = tracked[0]
            width = len(first.input.ids) * first.span
            folds = not isinstance(self.modules[name], (nn.BatchNorm1d, nn.BatchNorm2d))
            for call in tracked[1:]:
                a, b = torch.arange(width) // first.span, torch.arange(width) // call.span
                for i, j in dict.fromkeys(zip(a.tolist(), b.tolist())):
                    self.union(first.input.ids[i], call.input.ids[j], f"{name}, called on both")
                if folds:
                    differ = torch.nonzero(first.input.values[a] != call.input.values[b]).flatten().tolist()
                    pairs = {(first.input.ids[int(a[k])], call.input.ids[int(b[k])]) for k in differ}
                    self.pin([i for pair in pairs for i in pair], TIE,
                             f"{name} is called on several inputs whose pruned channels hold different constants, "
                             f"and one bias cannot fold both")
