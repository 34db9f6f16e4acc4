"""The dense gradient that growth criteria rank by (masking rule 6, docs/design.md).

`weight_orig.grad` is already masked, so RigL, SNFS and GraNet read `dL/dW` from the recomputed
`weight` instead: while capture is armed for a target, its `DSTMask` hook holds a `DenseGradient` sink and
registers it as a tensor hook on the weight it recomputes; the sink adds the incoming gradient (dense,
masked positions included). Capture is armed only on the steps that need it (RigL: the step before an
update; SNFS: every step), so it costs nothing otherwise. A deep copy of the model (an EMA) copies the
hooks without their sinks, so it never captures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DenseGradient", "arm", "disarm"]


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


def arm(targets: Sequence, sinks: Sequence[DenseGradient]) -> None:
    """Capture the dense gradient of each target into its sink from the next forward on."""
    for target, sink in zip(targets, sinks):
        target.hook.sink = sink


def disarm(targets: Sequence) -> None:
    """Stop capturing."""
    for target in targets:
        target.hook.sink = None
