"""GraNet: gradual pruning with zero-cost neuroregeneration (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .gmp import Gradual, GradualPruning
from .registry import register_method
from .rigl import RigL

__all__ = ["GraNet"]


@register_method("granet")
@dataclasses.dataclass(eq=False, kw_only=True)
class GraNet(Gradual, RigL):
    """GraNet: GMP's cubic pruning, then RigL's regeneration, at every pruning step.

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

    initial_sparsity: float = 0.0
    begin_step: int = 0
    drop_fraction: float = 0.5
    decay: str | Callable[[float], float] = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pruning = GradualPruning(self, self.initial_sparsity, self.begin_step)

    def prepare(self) -> None:
        self.pruning.prune_to_budget()  # (the dense gradients were taken first: they are of the step before)

    def metrics(self) -> dict:
        return {"scheduled_sparsity": self.pruning.current_sparsity(), **super().metrics()}
