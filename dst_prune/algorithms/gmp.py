"""Gradual magnitude pruning, GMP (Zhu & Gupta, "To prune, or not to prune", 2017)."""

from __future__ import annotations

from ..distributions import apportion, layer_shares, total_budget
from ..errors import DSTError
from ..schedules import UpdateSchedule, cubic_sparsity
from ..selection import global_top_k, top_k_mask
from .base import SparseAlgorithm, check_fraction

__all__ = ["GMP"]


class GMP(SparseAlgorithm):
    """GMP: prune the smallest weights gradually, from `initial_sparsity` to the target, on a cubic schedule.

    Zhu & Gupta 2017, eq. 1: at steps `t = t_0 + k * dt` up to `t_end`, the sparsity is
    `s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** 3` and the weights with the smallest
    magnitude are pruned until exactly `round((1 - s_t) * N)` remain; pruned weights never come back.
    `t_0 = begin_step`, `dt = update_every`, `t_end = stop_fraction * total_steps` (0.75) or `stop_step`.
    With `distribution="global"` the smallest weights of the whole model are pruned (at least one stays
    in every layer); otherwise each layer keeps its share of the layer-wise distribution.

    Args:
        initial_sparsity: `s_i`, the sparsity training starts from (0: dense).
        begin_step: `t_0`, the step pruning starts after (0).
    """

    name = "gmp"
    gradual = True
    default_stop_fraction = 0.75
    needs_total_steps = True

    def __init__(self, initial_sparsity: float = 0.0, begin_step: int = 0) -> None:
        super().__init__()
        self.start_sparsity = check_fraction(initial_sparsity, "initial_sparsity")
        if isinstance(begin_step, bool) or not isinstance(begin_step, int) or begin_step < 0:
            raise DSTError(f"begin_step must be a non-negative integer; received {begin_step!r}.")
        self.begin_step = begin_step

    def initial_sparsity(self, final: float) -> float:
        if self.start_sparsity > final:
            raise DSTError(f"initial_sparsity={self.start_sparsity} is above sparsity={final}: method={self.name!r} "
                           f"only prunes. Pass an initial_sparsity at most the target.")
        return self.start_sparsity

    @property
    def end_step(self) -> int:
        return self.controller.schedule.stop_step

    def check_schedule(self, schedule: UpdateSchedule) -> None:
        if schedule.stop_step <= self.begin_step:
            raise DSTError(f"method={self.name!r} prunes between begin_step={self.begin_step} and the stop step "
                           f"{schedule.stop_step}; make total_steps/stop_fraction (or stop_step) end after "
                           f"begin_step.")

    def is_update_step(self, step: int) -> bool:
        if not self.begin_step < step <= self.end_step:
            return False
        return step == self.end_step or (step - self.begin_step) % self.controller.schedule.period(step) == 0

    def current_sparsity(self) -> float:
        return cubic_sparsity(self.step, self.begin_step, self.end_step, self.start_sparsity,
                              self.controller.target_sparsity)

    def prune_to_schedule(self) -> None:
        """Prune the smallest active weights until exactly `round((1 - s_t) * N)` remain."""
        controller = self.controller
        budget = min(total_budget(self.current_sparsity(), controller.n_groups), controller.budget)
        magnitudes = [t.scores(t.orig).masked_fill(~t.group_mask(), float("-inf")) for t in self.targets]
        if controller.distribution == "global":
            keep = global_top_k(magnitudes, budget)
        else:
            shares = layer_shares([t.shape for t in self.targets], controller.distribution,
                                  [t.n_groups for t in self.targets])
            counts = apportion(budget, shares, [t.active_groups() for t in self.targets])
            keep = [top_k_mask(m, c) for m, c in zip(magnitudes, counts)]
        for layer, (target, kept) in enumerate(zip(self.targets, keep)):
            self.prune(layer, target.group_mask() & ~kept)
        controller.budget = budget

    def reparameterize(self) -> None:
        self.prune_to_schedule()

    def metrics(self) -> dict:
        return {"scheduled_sparsity": self.current_sparsity()}
