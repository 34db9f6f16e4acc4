"""Dynamic Sparse Reparameterization (Mostafa & Wang, ICML 2019, Algorithm 1)."""

from __future__ import annotations

import logging

import torch

from ..distributions import apportion
from ..errors import DSTError
from ..selection import random_indices, random_positions, top_k_mask
from .base import SparseAlgorithm

__all__ = ["DSR"]

logger = logging.getLogger(__name__)


class DSR(SparseAlgorithm):
    """DSR: prune by one global magnitude threshold that adapts, regrow in proportion to survivors.

    Every reallocation (Mostafa & Wang 2019, Algorithm 1, lines 6-17):

    1. `prune_by_threshold`: in every sparse tensor `l`, deactivate the active weights with `|w| < H`;
       `K_l` are pruned and `R_l` survive (the strongest weight of a tensor is kept if all fall below
       `H`, so no tensor is ever emptied).
    2. `adjust_pruning_threshold`: with `K = target_fraction_to_prune * N` (`N` sparse parameters),
       `H <- 2H` if `sum K_l < (1 - delta) K`, `H <- H / 2` if `sum K_l > (1 + delta) K`.
    3. `reallocate_free_parameters`: tensor `l` gets `sum_k K_k * R_l / sum_k R_k` of the freed budget
       (largest-remainder rounding, so exactly `sum K_l` are regrown), grown at random inactive
       positions that were not pruned in this same update, at value zero.

    Args:
        target_fraction_to_prune: `K` as a fraction of the sparse parameters (paper: 0.01).
        pruning_threshold: the initial threshold `H` (paper: 0.001).
        delta: the fractional tolerance around `K` (paper: 0.1).
    """

    name = "dsr"

    def __init__(self, target_fraction_to_prune: float = 1e-2, pruning_threshold: float = 1e-3,
                 delta: float = 0.1) -> None:
        super().__init__()
        checks = {
            "target_fraction_to_prune": (target_fraction_to_prune, lambda v: 0 < v <= 1, "in (0, 1]"),
            "pruning_threshold": (pruning_threshold, lambda v: v > 0, "> 0"),
            "delta": (delta, lambda v: 0 <= v < 1, "in [0, 1)"),
        }
        for argument, (value, ok, expected) in checks.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise DSTError(f"{argument} must be a number {expected}; received {value!r}.")
        self.target_fraction_to_prune = float(target_fraction_to_prune)
        self.threshold = float(pruning_threshold)
        self.delta = float(delta)
        self._pruned: list[torch.Tensor] | None = None  # positions pruned in the update under way
        self._freed: list[int] = []
        self._surviving: list[int] = []

    def bind(self, controller) -> None:
        super().bind(controller)
        if self.target_count > controller.budget / 2:
            logger.warning(
                "DSR: K = target_fraction_to_prune * N = %d is %.0f%% of the %d active weights, so most of them "
                "are replaced at every update. K is a fraction of all sparse parameters; at high sparsity lower "
                "it, e.g. target_fraction_to_prune=%.2g (10%% of the active weights, the default's ratio at 90%% "
                "sparsity)", self.target_count, 100 * self.target_count / controller.budget, controller.budget,
                0.1 * controller.budget / controller.n_groups)

    @property
    def target_count(self) -> int:
        """`K`: the number of weights (groups) each reallocation aims to prune."""
        return round(self.target_fraction_to_prune * self.controller.n_groups)

    def reparameterize(self) -> None:
        self.prune_by_threshold()
        self.adjust_pruning_threshold()
        self.reallocate_free_parameters()

    def prune_by_threshold(self) -> int:
        """Step 1: prune the active weights (groups: by their mean `|w|`) below the threshold. Returns how many."""
        self._pruned, self._freed, self._surviving = [], [], []
        for layer, target in enumerate(self.targets):
            active_groups = target.group_mask()
            below = target.grouping.below(target.orig, self.threshold).logical_and_(active_groups)
            active = int(torch.count_nonzero(active_groups))
            if active and int(torch.count_nonzero(below)) == active:  # keep the strongest: never empty a tensor
                below &= ~top_k_mask(target.scores(target.orig).masked_fill(~active_groups, -1.0), 1)
            freed = (self.set_indices(layer, below.reshape(-1).nonzero().view(-1), False, below)
                     if target.grouping.elementwise else self.prune(layer, below))
            self._pruned.append(below)
            self._freed.append(freed)
            self._surviving.append(active - freed)
        return sum(self._freed)

    def adjust_pruning_threshold(self) -> float:
        """Step 2: double or halve `H` depending on how many were pruned. Returns the new threshold."""
        if self._pruned is not None:
            freed, target = sum(self._freed), self.target_count
            if freed < (1 - self.delta) * target:
                self.threshold *= 2
            elif freed > (1 + self.delta) * target:
                self.threshold /= 2
        return self.threshold

    def reallocate_free_parameters(self) -> int:
        """Step 3: regrow the freed budget in proportion to the survivors. Returns the number grown.

        With `n:m` granularity each block regrows what it lost (the pattern fixes every block's count).
        """
        if self._pruned is None:
            return 0
        pruned, freed, surviving = self._pruned, sum(self._freed), self._surviving
        self._pruned = None
        room = [t.n_groups - r - k for t, r, k in zip(self.targets, surviving, self._freed)]
        reuse_pruned = freed > sum(room)
        if reuse_pruned:  # denser than 50%: not enough never-pruned zeros, so reuse just-pruned slots too
            logger.warning("DSR: %d weights freed but only %d inactive positions were not just pruned; "
                           "regrowing some at positions pruned in this update", freed, sum(room))
            room = [t.n_groups - r for t, r in zip(self.targets, surviving)]
        counts = apportion(freed, surviving, room)
        grown = 0
        for layer, (target, count) in enumerate(zip(self.targets, counts)):
            if target.grouping.kind == "n:m":  # prefer never-pruned zeros, within each block
                scores = self.random_scores(layer) + 2.0 * ~pruned[layer]
                grown += self.grow(layer, self.regrow_in_blocks(layer, scores, ~target.group_mask(), pruned[layer]))
                continue
            # inactive and (unless reused) not just pruned: ~(mask | pruned), one bool tensor
            candidates = ~target.group_mask() if reuse_pruned else target.group_mask().logical_or(
                pruned[layer]).logical_not_()
            if target.grouping.elementwise:
                grown += self.set_indices(layer, random_indices(candidates, count, self.generator(layer)), True)
            else:
                grown += self.grow(layer, random_positions(candidates, count, self.generator(layer)))
        return grown

    def metrics(self) -> dict:
        return {"threshold": self.threshold}

    def state_dict(self) -> dict:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
