"""The dense gradient that growth criteria rank by (DESIGN.md rule 6).

`weight_orig.grad` is already masked, so RigL, SNFS and GraNet read `dL/dW` from the recomputed
`weight` instead: while capture is armed for a module, `DSTMask` registers a tensor hook on the weight it
recomputes, and the hook adds the incoming gradient (dense, masked positions included) to a
`DenseGradient` sink. Capture is armed only on the steps that need it (RigL: the step before an
update; SNFS: every step), so it costs nothing otherwise. The registry is keyed weakly by module, so a
deep copy of the model (an EMA) never captures.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DenseGradient", "arm", "disarm", "sink_for"]

_SINKS: weakref.WeakKeyDictionary[nn.Module, dict[str, DenseGradient]] = weakref.WeakKeyDictionary()


class DenseGradient:
    """Sums the gradients of one recomputed weight over the backward passes of a step (micro-batches too)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, grad: torch.Tensor) -> None:
        grad = grad.detach().float()
        if self.value is None:
            self.value = grad.clone()
        else:
            self.value.add_(grad)

    def take(self) -> torch.Tensor | None:
        """The summed gradient so far (None if no backward reached it), resetting the sum."""
        value, self.value = self.value, None
        return value


def sink_for(module: nn.Module, tensor_name: str) -> DenseGradient | None:
    sinks = _SINKS.get(module)
    return sinks.get(tensor_name) if sinks else None


def arm(targets: Sequence, sinks: Sequence[DenseGradient]) -> None:
    """Capture the dense gradient of each target into its sink from the next forward on."""
    for target, sink in zip(targets, sinks):
        _SINKS.setdefault(target.module, {})[target.tensor_name] = sink


def disarm(targets: Sequence) -> None:
    for target in targets:
        _SINKS.pop(target.module, None)
