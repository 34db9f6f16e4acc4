"""Sparse Evolutionary Training (Mocanu et al., Nature Communications 2018)."""

from __future__ import annotations

from ..schedules import decayed_fraction
from .base import SparseAlgorithm, check_decay, check_fraction

__all__ = ["SET"]


class SET(SparseAlgorithm):
    """SET: per layer, drop the weakest active weights and regrow as many at random, at zero.

    Mocanu et al. 2018, Algorithm 1: after each training period, remove a fraction `zeta` of the
    active weights closest to zero (here: the smallest `|w|`, as RigL's reimplementation does) and add
    the same number of new connections at random inactive positions of the same layer.

    Args:
        drop_fraction: `zeta`, the fraction of each layer's active weights replaced per update (0.3).
        decay: `constant` as in the paper; `cosine` or `linear` decay it to zero at the stop step.
    """

    name = "set"

    def __init__(self, drop_fraction: float = 0.3, decay: str = "constant") -> None:
        super().__init__()
        self.drop_fraction = check_fraction(drop_fraction, "drop_fraction")
        self.decay = check_decay(decay)

    @property
    def needs_total_steps(self) -> bool:  # only a decaying fraction needs an end
        return self.decay != "constant"

    def current_drop_fraction(self) -> float:
        return decayed_fraction(self.drop_fraction, self.step, self.controller.decay_end, self.decay)

    def reparameterize(self) -> None:
        self.exchange(self.current_drop_fraction(), None)  # random growth

    def metrics(self) -> dict:
        return {"drop_fraction": self.current_drop_fraction()}
