"""Sparse momentum, SNFS (Dettmers & Zettlemoyer, "Sparse Networks from Scratch", 2019)."""

from __future__ import annotations

import torch

from ..schedules import decayed_fraction
from .base import SparseAlgorithm, check_decay, check_fraction

__all__ = ["SNFS"]


class SNFS(SparseAlgorithm):
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
    every step and averaged across ranks every step, so it is the same on every rank.

    Args:
        drop_fraction: the initial prune rate `p` (0.5).
        decay: `cosine` (the paper) to zero at the stop step, `linear` or `constant`.
        momentum: `beta` of the dense-gradient momentum (0.9, the paper's SGD momentum).
    """

    name = "snfs"
    default_stop_fraction = 1.0
    needs_total_steps = True

    def __init__(self, drop_fraction: float = 0.5, decay: str = "cosine", momentum: float = 0.9) -> None:
        super().__init__()
        self.drop_fraction = check_fraction(drop_fraction, "drop_fraction")
        self.decay = check_decay(decay)
        self.beta = check_fraction(momentum, "momentum")
        self.momentum: list[torch.Tensor] | None = None

    def current_drop_fraction(self) -> float:
        return decayed_fraction(self.drop_fraction, self.step, self.controller.decay_end, self.decay)

    def needs_dense_gradient(self, step: int) -> bool:
        stop = self.controller.schedule.stop_step
        return stop is None or step < stop

    def after_optimizer_step(self, step: int) -> None:
        if not self.needs_dense_gradient(step):
            return
        gradients = self.dense_gradients()
        if self.momentum is None:
            self.momentum = gradients
            return
        for momentum, gradient in zip(self.momentum, gradients):
            momentum.mul_(self.beta).add_(gradient)

    def momentum_shares(self) -> list[float]:
        """Each layer's mean momentum magnitude over its active weights."""
        return [float(m.abs()[t.mask].mean()) if t.active() else 0.0 for m, t in zip(self.momentum, self.targets)]

    def reparameterize(self) -> None:
        if self.momentum is None:  # no step yet: nothing to rank by
            return
        shares = self.momentum_shares()
        self.exchange(self.current_drop_fraction(), lambda layer: self.targets[layer].scores(self.momentum[layer]),
                      lambda dropped, rooms: self.redistribute(dropped, rooms, shares))

    def metrics(self) -> dict:
        return {"drop_fraction": self.current_drop_fraction()}

    def state_dict(self) -> dict:
        return {"momentum": None if self.momentum is None else [m.clone() for m in self.momentum]}

    def load_state_dict(self, state: dict) -> None:
        momentum = state.get("momentum")
        if momentum is None:
            self.momentum = None
            return
        self.momentum = [m.to(device=t.mask.device, dtype=torch.float32) for m, t in zip(momentum, self.targets)]
