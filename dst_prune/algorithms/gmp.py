"""Gradual magnitude pruning, GMP (Zhu & Gupta, "To prune, or not to prune", 2017)."""

from __future__ import annotations

import dataclasses

from .._selection import global_top_k, top_k_mask
from .._validation import check_int, check_number
from ..budget.distributions import apportion, layer_shares, total_budget
from ..errors import DSTError
from ..schedules import UpdateSchedule, cubic_sparsity
from .base import SparseAlgorithm
from .registry import register_method

__all__ = ["GMP", "Gradual", "GradualPruning"]


class GradualPruning:
    """The cubic schedule of Zhu & Gupta 2017, eq. 1, and the pruning to it; shared by GMP and GraNet.

    At steps `t = t_0 + k * dt` up to `t_end`, the sparsity is
    `s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** 3`, and the weights with the smallest
    magnitude are pruned until exactly `round((1 - s_t) * N)` remain; pruned weights never come back.
    `t_0 = begin_step`, `dt = update_every`, `t_end` the stop step. With `distribution="global"` the
    smallest weights of the whole model are pruned (at least one stays in every layer); otherwise each
    layer keeps its share of the layer-wise distribution.
    """

    def __init__(self, algorithm: SparseAlgorithm, initial_sparsity: float, begin_step: int) -> None:
        self.algorithm = algorithm
        self.start_sparsity = check_number(initial_sparsity, "initial_sparsity", low=0.0, high=1.0)
        self.begin_step = check_int(begin_step, "begin_step", minimum=0)

    @property
    def end_step(self) -> int:
        return self.algorithm.context.schedule.stop_step

    def starting_sparsity(self, final: float) -> float:
        if self.start_sparsity > final:
            raise DSTError(f"initial_sparsity={self.start_sparsity} is above sparsity={final}: method="
                           f"{self.algorithm.name!r} only prunes. Pass an initial_sparsity at most the target.")
        return self.start_sparsity

    def check_schedule(self, schedule: UpdateSchedule) -> None:
        if schedule.stop_step <= self.begin_step:
            raise DSTError(f"method={self.algorithm.name!r} prunes between begin_step={self.begin_step} and the stop "
                           f"step {schedule.stop_step}; make total_steps/stop_fraction (or stop_step) end after "
                           f"begin_step.")

    def is_update_step(self, step: int) -> bool:
        if not self.begin_step < step <= self.end_step:
            return False
        return step == self.end_step or (step - self.begin_step) % self.algorithm.context.schedule.period(step) == 0

    def current_sparsity(self) -> float:
        context = self.algorithm.context
        return cubic_sparsity(context.step, self.begin_step, self.end_step, self.start_sparsity,
                              context.target_sparsity)

    def next_budget(self) -> int:
        context = self.algorithm.context
        return min(total_budget(self.current_sparsity(), context.n_groups), context.budget)

    def prune_to_budget(self) -> None:
        """Prune the smallest active groups until exactly `context.budget` remain."""
        algorithm, context = self.algorithm, self.algorithm.context
        targets = context.targets
        magnitudes = [algorithm.magnitudes(i).masked_fill(~t.group_mask(), float("-inf")) for i, t in
                      enumerate(targets)]
        if context.distribution == "global":
            keep = global_top_k(magnitudes, context.budget)
        else:
            shares = layer_shares([t.shape for t in targets], context.distribution, [t.n_groups for t in targets])
            counts = apportion(context.budget, shares, [t.active_groups() for t in targets])
            keep = [top_k_mask(m, c) for m, c in zip(magnitudes, counts)]
        for layer, (target, kept) in enumerate(zip(targets, keep)):
            algorithm.prune(layer, target.group_mask() & ~kept)


class Gradual:
    """Mixin of the gradual methods: the schedule, the start sparsity and the budget come from `self.pruning`."""

    pruning: GradualPruning
    gradual = True
    needs_total_steps = True

    def starting_sparsity(self, final: float) -> float:
        return self.pruning.starting_sparsity(final)

    def check_schedule(self, schedule: UpdateSchedule) -> None:
        self.pruning.check_schedule(schedule)

    def is_update_step(self, step: int) -> bool:
        return self.pruning.is_update_step(step)

    def next_budget(self) -> int:
        return self.pruning.next_budget()


@register_method("gmp")
@dataclasses.dataclass(eq=False, kw_only=True)
class GMP(Gradual, SparseAlgorithm):
    """GMP: prune the smallest weights gradually, from `initial_sparsity` to the target, on a cubic schedule.

    Zhu & Gupta 2017, eq. 1 (see `GradualPruning`); `t_end = stop_fraction * total_steps` (0.75) or
    `stop_step`.

    Args:
        initial_sparsity: `s_i`, the sparsity training starts from (0: dense).
        begin_step: `t_0`, the step pruning starts after (0).
    """

    default_stop_fraction = 0.75

    initial_sparsity: float = 0.0
    begin_step: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pruning = GradualPruning(self, self.initial_sparsity, self.begin_step)

    def reparameterize(self) -> None:
        self.pruning.prune_to_budget()

    def metrics(self) -> dict:
        return {"scheduled_sparsity": self.pruning.current_sparsity()}
