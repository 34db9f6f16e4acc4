"""Sparse momentum, SNFS (Dettmers & Zettlemoyer, "Sparse Networks from Scratch", 2019)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from .._scores import finite_gradient
from .._validation import check_number
from ..budget.distributions import apportion
from ..errors import DSTError
from .drop_and_grow import DropAndGrow
from .registry import register_method

__all__ = ["SNFS"]


@register_method("snfs")
@dataclasses.dataclass(eq=False, kw_only=True)
class SNFS(DropAndGrow):
    """Sparse momentum: prune by magnitude, redistribute and regrow by the momentum of the dense gradient.

    Dettmers & Zettlemoyer 2019, Algorithm 1, at each update:

    1. every layer prunes the fraction `p` (cosine-decayed, `prune rate`) of its active weights with the
       smallest magnitude;
    2. the total pruned is redistributed across layers in proportion to the mean momentum magnitude of
       each layer's active weights (`m_l / sum_k m_k`), capped by the room in each layer;
    3. each layer regrows its share at the inactive positions with the largest momentum magnitude, at
       zero.

    The momentum is `M <- beta * M + dL/dW` of the dense gradient (masked positions included), kept by
    dst_prune because the optimizer's own momentum is zero where the gradient is masked. It is captured
    every step and averaged across ranks every step, so it is the same on every rank; non-finite gradient
    entries count as zero, so the momentum stays finite.

    Args:
        drop_fraction: the initial prune rate `p` (0.5).
        decay: `cosine` (the paper) to zero at the stop step, `linear` or `constant`.
        momentum: `beta` of the dense-gradient momentum (0.9, the paper's SGD momentum).
    """

    default_stop_fraction = 1.0

    drop_fraction: float = 0.5
    decay: str | Callable[[float], float] = "cosine"
    momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        self.momentum = check_number(self.momentum, "momentum", low=0.0, high=1.0)
        self.gradient_momentum: list[torch.Tensor] | None = None  # `M`, one per sparse tensor
        self._accumulated_step = 0  # the last step whose gradient the momentum holds

    def needs_dense_gradient(self, step: int) -> bool:
        stop = self.context.schedule.stop_step
        return stop is None or step < stop

    def after_optimizer_step(self, step: int) -> None:
        if not self.needs_dense_gradient(step) or step == self._accumulated_step:
            return  # (the second case: a retry of a step whose update failed; its gradient is in already)
        gradients = self.dense_gradients()
        self._accumulated_step = step
        if self.gradient_momentum is None:
            self.gradient_momentum = gradients
            return
        for momentum, gradient in zip(self.gradient_momentum, gradients):
            momentum.mul_(self.momentum).add_(gradient)

    def momentum_shares(self) -> list[float]:
        """Each layer's mean momentum magnitude over its active weights (0 where it is not finite)."""
        shares = [float(m.abs()[t.mask].mean()) if t.active() else 0.0
                  for m, t in zip(self.gradient_momentum, self.targets)]
        return [s if math.isfinite(s) else 0.0 for s in shares]

    def reparameterize(self) -> None:
        if self.gradient_momentum is None:  # no step yet: nothing to rank by
            return
        super().reparameterize()

    def restore(self, snapshot: dict) -> None:
        """Undo a failed update, except the momentum, which keeps the step's gradient (counted once)."""
        accumulated = self._accumulated_step
        super().restore(snapshot)
        self._accumulated_step = accumulated

    def grow_scores(self, layer: int) -> torch.Tensor:
        return self.targets[layer].scores(self.gradient_momentum[layer])

    def grow_counts(self, dropped: Sequence[int], rooms: Sequence[int]) -> list[int]:
        return apportion(sum(dropped), self.momentum_shares(), rooms)

    def state_dict(self) -> dict:
        return {"momentum": None if self.gradient_momentum is None else [m.clone() for m in self.gradient_momentum]}

    def check_state(self, state: dict) -> None:
        momentum = state.get("momentum")
        if momentum is None:
            return
        shapes = [tuple(t.shape) for t in self.targets]
        if not isinstance(momentum, list) or [tuple(getattr(m, "shape", ())) for m in momentum] != shapes:
            raise DSTError("the saved SNFS momentum does not match the sparse tensors (one tensor of each "
                           "parameter's shape expected); the checkpoint is of another model.")

    def load_state_dict(self, state: dict) -> None:
        momentum = state.get("momentum")
        self.gradient_momentum = None if momentum is None else [  # (non-finite entries count as zero, as when run)
            finite_gradient(m.to(device=t.mask.device, dtype=torch.float32).clone(), t.name, "saved SNFS momentum")
            for m, t in zip(momentum, self.targets)]
