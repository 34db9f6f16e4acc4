"""GraNet: gradual pruning with zero-cost neuroregeneration (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

from ..schedules import decayed_fraction
from .base import check_decay, check_fraction
from .gmp import GMP

__all__ = ["GraNet"]


class GraNet(GMP):
    """GraNet: GMP's cubic pruning plus, at every pruning step, RigL-style regeneration.

    Liu et al. 2021, Algorithm 1: at each update `t` up to `t_end`, (1) gradual magnitude pruning to
    `s_t` (the cubic schedule of Zhu & Gupta, eq. 1; the paper prunes globally: pass
    `distribution="global"`), then (2) neuroregeneration: each layer drops a fraction `r_t` of its active
    weights with the smallest magnitude and regrows as many where the dense gradient is largest, at
    zero, `r_t` decaying from `drop_fraction` (0.5) to zero at `t_end` by cosine. The dense gradient is
    captured on the step before each update and averaged across ranks.

    Args:
        initial_sparsity: `s_i`, the sparsity training starts from (0: dense; the paper also uses 0.5).
        begin_step: `t_0`, the step pruning starts after (0).
        drop_fraction: the initial regeneration fraction `r` (0.5).
        decay: `cosine` (the paper), `linear` or `constant`.
    """

    name = "granet"

    def __init__(self, initial_sparsity: float = 0.0, begin_step: int = 0, drop_fraction: float = 0.5,
                 decay: str = "cosine") -> None:
        super().__init__(initial_sparsity=initial_sparsity, begin_step=begin_step)
        self.drop_fraction = check_fraction(drop_fraction, "drop_fraction")
        self.decay = check_decay(decay)

    def current_drop_fraction(self) -> float:
        return decayed_fraction(self.drop_fraction, self.step, self.end_step, self.decay)

    def needs_dense_gradient(self, step: int) -> bool:
        return self.is_update_step(step)

    def reparameterize(self) -> None:
        gradients = self.dense_gradients()
        self.prune_to_schedule()
        self.exchange(self.current_drop_fraction(), lambda layer: self.targets[layer].scores(gradients[layer]))

    def metrics(self) -> dict:
        return {**super().metrics(), "drop_fraction": self.current_drop_fraction()}
