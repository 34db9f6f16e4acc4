"""Rigging the Lottery, RigL (Evci et al., ICML 2020)."""

from __future__ import annotations

from ..schedules import decayed_fraction
from .base import SparseAlgorithm, check_decay, check_fraction

__all__ = ["RigL"]


class RigL(SparseAlgorithm):
    """RigL: per layer, drop the weakest active weights, grow where the dense gradient is largest.

    Evci et al. 2020, sec. 3: every `update_every` steps (100) until `T_end = stop_fraction * total_steps`
    (0.75), each layer drops `f(t) * active` weights with the smallest `|w|` and grows as many inactive
    connections with the largest `|dL/dW|`, initialised to zero, with `f(t) = alpha / 2 * (1 + cos(pi t /
    T_end))` (eq. 1, `alpha = drop_fraction = 0.3`). The dense gradient is captured only on the step
    before each update (DESIGN.md rule 6) and averaged across ranks.

    Args:
        drop_fraction: `alpha`, the initial fraction of each layer's active weights replaced (0.3).
        decay: `cosine` (the paper), `linear` or `constant`.
    """

    name = "rigl"
    default_stop_fraction = 0.75
    needs_total_steps = True

    def __init__(self, drop_fraction: float = 0.3, decay: str = "cosine") -> None:
        super().__init__()
        self.drop_fraction = check_fraction(drop_fraction, "drop_fraction")
        self.decay = check_decay(decay)

    def current_drop_fraction(self) -> float:
        return decayed_fraction(self.drop_fraction, self.step, self.controller.decay_end, self.decay)

    def needs_dense_gradient(self, step: int) -> bool:
        return self.is_update_step(step)

    def reparameterize(self) -> None:
        gradients = self.dense_gradients()
        self.exchange(self.current_drop_fraction(), lambda layer: self.targets[layer].scores(gradients[layer]))

    def metrics(self) -> dict:
        return {"drop_fraction": self.current_drop_fraction()}
