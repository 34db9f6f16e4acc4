"""Dynamic Sparse Reparameterization (Mostafa & Wang, ICML 2019, Algorithm 1)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from .._scores import warn_non_finite
from .._scratch import CHUNK, scratch
from .._selection import Outside, index_mask, nonzero_indices, random_indices, top_k_mask
from .._validation import check_number
from ..budget.distributions import apportion
from ..errors import DSTError
from ..groups import Grouping
from .base import SparseAlgorithm
from .registry import register_method

__all__ = ["DSR"]

logger = logging.getLogger(__name__)


@register_method("dsr")
@dataclasses.dataclass(eq=False, kw_only=True)
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

    The three steps can be called one by one (the seed's API), in this order only: a step out of order is
    refused (`DSTError`) instead of losing the freed budget.

    Args:
        target_fraction_to_prune: `K` as a fraction of the sparse parameters (paper: 0.01).
        pruning_threshold: the initial threshold `H` (paper: 0.001).
        delta: the fractional tolerance around `K` (paper: 0.1).
    """

    target_fraction_to_prune: float = 1e-2
    pruning_threshold: float = 1e-3
    delta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_fraction_to_prune = check_number(self.target_fraction_to_prune, "target_fraction_to_prune",
                                                     low=0.0, high=1.0, low_open=True, high_open=False)
        self.pruning_threshold = check_number(self.pruning_threshold, "pruning_threshold", low=0.0, low_open=True)
        self.threshold = self.pruning_threshold  # `H`, which adapts at every update (the hyperparameter stays)
        self.delta = check_number(self.delta, "delta", low=0.0, high=1.0)
        self._pruned: list[tuple] | None = None  # (group indices, bool groups) pruned in the update under way
        self._adjusted = False
        self._freed: list[int] = []
        self._surviving: list[int] = []

    def bind(self, context) -> None:
        super().bind(context)
        if self.target_count > context.budget / 2:
            logger.warning(
                "DSR: K = target_fraction_to_prune * N = %d is %.0f%% of the %d active weights, so most of them "
                "are replaced at every update. K is a fraction of all sparse parameters; at high sparsity lower "
                "it, e.g. target_fraction_to_prune=%.2g (10%% of the active weights, the default's ratio at 90%% "
                "sparsity)", self.target_count, 100 * self.target_count / context.budget, context.budget,
                0.1 * context.budget / context.n_groups)

    @property
    def target_count(self) -> int:
        """`K`: the number of weights (groups) each reallocation aims to prune."""
        return round(self.target_fraction_to_prune * self.context.n_groups)

    @property
    def pending(self) -> bool:
        """Whether `prune_by_threshold` ran and its freed budget awaits `reallocate_free_parameters`."""
        return self._pruned is not None

    @property
    def freed(self) -> tuple[int, ...]:
        """`K_l` per sparse tensor: the weights (groups) the last `prune_by_threshold` freed (step 1), whose sum
        step 3 regrows."""
        return tuple(self._freed)

    @property
    def surviving(self) -> tuple[int, ...]:
        """`R_l` per sparse tensor: the active weights (groups) that survived the last `prune_by_threshold`, the
        shares in which step 3 regrows the freed budget (`sum_k K_k * R_l / sum_k R_k`)."""
        return tuple(self._surviving)

    def check_ready(self) -> None:
        self._refuse_pending("an update")

    def reparameterize(self) -> None:
        self._refuse_pending("reparameterize()")
        self.prune_by_threshold()
        self.adjust_pruning_threshold()
        self.reallocate_free_parameters()

    def _refuse_pending(self, call: str) -> None:
        if self.pending:
            raise DSTError(f"{call}: prune_by_threshold() freed {sum(self._freed)} weights that are not regrown yet; "
                           f"call {'adjust_pruning_threshold() and ' if not self._adjusted else ''}"
                           f"reallocate_free_parameters() first, or the budget would be lost.")

    def prune_by_threshold(self) -> int:
        """Step 1: prune the active weights (groups: by their mean `|w|`) below the threshold. Returns how many.

        Non-finite weights count as below any threshold (the non-finite policy of `dst_prune._scores`).
        """
        self._refuse_pending("prune_by_threshold()")
        pruned, freed, surviving = [], [], []
        for layer, target in enumerate(self.targets):
            grouping, orig = target.grouping, target.orig.detach()
            active = self.context.active_groups(layer)
            bad = warn_non_finite(orig, target.name)  # (they are below any threshold)
            if grouping.elementwise and not bad and orig.dtype in (torch.float32, torch.float64):
                below = _magnitude_below(orig, self.threshold).logical_and_(target.mask)  # (finite)
            else:
                below = grouping.below(target.orig, self.threshold).logical_and_(target.group_mask())
            indices = nonzero_indices(below)
            if active and indices.numel() == active:  # keep the strongest: never empty a tensor
                below &= ~top_k_mask(self.magnitudes(layer).masked_fill(~target.group_mask(), float("-inf")), 1)
                indices = nonzero_indices(below)
            count = self.set_indices(layer, indices, False, below) if grouping.elementwise else self.prune(layer, below)
            pruned.append((indices, below))
            freed.append(count)
            surviving.append(active - count)
        self._pruned, self._freed, self._surviving, self._adjusted = pruned, freed, surviving, False
        return sum(freed)

    def adjust_pruning_threshold(self) -> float:
        """Step 2: double or halve `H` depending on how many were pruned. Returns the new threshold."""
        if not self.pending or self._adjusted:
            raise DSTError("adjust_pruning_threshold() follows prune_by_threshold(), once per update; call "
                           "prune_by_threshold() first (or reparameterize() for all three steps).")
        freed, target = sum(self._freed), self.target_count
        if freed < (1 - self.delta) * target:
            self.threshold *= 2
        elif freed > (1 + self.delta) * target:
            self.threshold /= 2
        self._adjusted = True
        return self.threshold

    def reallocate_free_parameters(self) -> int:
        """Step 3: regrow the freed budget in proportion to the survivors. Returns the number grown.

        With `n:m` granularity each block regrows what it lost (the pattern fixes every block's count).
        """
        if not self.pending or not self._adjusted:
            raise DSTError("reallocate_free_parameters() follows prune_by_threshold() and "
                           "adjust_pruning_threshold(); call them first (or reparameterize() for all three steps).")
        pruned, freed, surviving = self._pruned, sum(self._freed), self._surviving
        room = [t.n_groups - r - k for t, r, k in zip(self.targets, surviving, self._freed)]
        reuse_pruned = freed > sum(room)
        if reuse_pruned:  # denser than 50%: not enough never-pruned zeros, so reuse just-pruned slots too
            logger.warning("DSR: %d weights freed but only %d inactive positions were not just pruned; "
                           "regrowing some at positions pruned in this update", freed, sum(room))
            room = [t.n_groups - r for t, r in zip(self.targets, surviving)]
        redistributes = all(t.grouping.redistributes for t in self.targets)
        counts = apportion(freed, surviving, room) if redistributes else list(self._freed)
        grown = 0
        for layer, (target, count) in enumerate(zip(self.targets, counts)):
            grouping, (dropped, dropped_flags) = target.grouping, pruned[layer]
            if grouping.redistributes and type(grouping).regrow is Grouping.regrow:  # ~(mask | pruned), never built
                candidates = Outside(target.group_mask(), exclude=None if reuse_pruned else (dropped, dropped_flags),
                                     active=self.context.active_groups(layer))
                grow = random_indices(candidates, count, self.generator(layer))
            elif grouping.redistributes:
                inactive = target.group_mask().logical_not().reshape(-1)
                candidates = inactive if reuse_pruned else inactive.index_fill_(0, dropped, False)
                grow = grouping.regrow(candidates, count, self.generator(layer))
            else:  # within each block, never-pruned zeros first
                inactive = target.group_mask().logical_not()
                bonus = torch.full((grouping.n_groups,), 2.0, device=inactive.device).index_fill_(0, dropped, 0.0)
                scores = torch.rand(grouping.group_shape, generator=self.generator(layer), device=inactive.device)
                scores += bonus.view(grouping.group_shape)
                grow = grouping.regrow(inactive.reshape(-1), count, self.generator(layer), scores=scores,
                                       dropped=dropped)
            if grouping.elementwise:
                grown += self.set_indices(layer, grow, True)
            else:
                grown += self.grow(layer, index_mask(grow, grouping.group_shape, target.mask.device))
        self._pruned, self._adjusted = None, False
        return grown

    def metrics(self) -> dict:
        return {"threshold": self.threshold}

    def state_dict(self) -> dict:
        if self.pending:
            raise DSTError("state_dict() during a DSR update: prune_by_threshold() freed weights that "
                           "reallocate_free_parameters() has not regrown yet. Finish the update first.")
        return {"threshold": self.threshold}

    def check_state(self, state: dict) -> None:
        check_number(state.get("threshold"), "the saved DSR threshold", low=0.0, low_open=True)

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        self._pruned, self._adjusted = None, False


def _magnitude_below(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """`|weights| < threshold` (bool, `weights`' shape), in chunks through a small buffer: no weight-sized float
    temporary (`dst_prune._scratch`)."""
    if weights.device.type != "cpu":  # (an accelerator's allocator reuses its blocks: one pass is cheaper there)
        return torch.lt(weights.detach().abs(), threshold)
    flat = weights.detach().reshape(-1)
    below = torch.empty(weights.shape, dtype=torch.bool, device=weights.device)
    out = below.view(-1)
    magnitudes = scratch(flat.dtype, flat.device, min(flat.numel(), CHUNK))
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK]
        magnitude = magnitudes[:part.numel()]
        torch.abs(part, out=magnitude)
        torch.lt(magnitude, threshold, out=out[start:start + CHUNK])
    return below
