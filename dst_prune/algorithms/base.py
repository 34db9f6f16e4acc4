"""The bookkeeping every DST algorithm shares; an algorithm only decides what it ranks by.

`prune` and `grow` write the bool masks in place and keep the invariants of DESIGN.md: pruned
weights are zeroed in `weight_orig`, regrown ones start at zero, the gradient and every optimizer
state tensor of the parameter's shape are zeroed at both, and the effective `weight` is recomputed.
`exchange` is the drop-and-grow step of SET, RigL, SNFS and GraNet: per layer, drop the active weights
with the lowest magnitude and grow the inactive ones with the highest score. Random choices come from
`generator(layer)`, seeded from `(seed, update index, layer)` only, so every rank of a distributed run
and every resumed run draws the same masks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..distributed import all_reduce_mean
from ..distributions import apportion
from ..errors import DSTError
from ..groups import top_k_per_block
from ..masking import fill_positions, unwrap_optimizer, zero_positions
from ..schedules import DECAYS, UpdateSchedule
from ..selection import GROWTH_STREAM, derive_seed, index_mask, random_indices, top_k_indices
from ..sparse_target import SparseTarget

if TYPE_CHECKING:
    from ..sparsity import DynamicSparsity

__all__ = ["SparseAlgorithm", "check_decay", "check_fraction"]

def check_fraction(value: object, argument: str, low: float = 0.0, high: float = 1.0) -> float:
    """`value` as a float in [low, high); DSTError naming `argument` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise DSTError(f"{argument} must be a number in [{low:g}, {high:g}); received {value!r}.")
    return float(value)


def check_decay(value: object) -> str:
    if value not in DECAYS:
        raise DSTError(f"decay={value!r} is unknown; valid choices: {', '.join(DECAYS)}.")
    return value


class SparseAlgorithm:
    """Base class of the DST algorithms (`method=` of `dst_prune.apply`).

    A subclass sets `name`, takes its hyperparameters as keyword arguments of `__init__` (validated
    there, before the model is touched) and implements `reparameterize`; it may override the schedule
    hooks below.
    """

    name: ClassVar[str] = ""
    #: starts denser and prunes to the target on its own schedule (GMP, GraNet)
    gradual: ClassVar[bool] = False
    #: stop reallocating at this fraction of `total_steps` unless `stop_fraction`/`stop_step` is given
    default_stop_fraction: ClassVar[float | None] = None
    #: whether its schedule cannot run without `total_steps` (or an explicit `stop_step`)
    needs_total_steps: ClassVar[bool] = False

    def __init__(self) -> None:
        self.controller: DynamicSparsity | None = None

    @classmethod
    def hyperparameters(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def create(cls, **hyperparameters: object) -> SparseAlgorithm:
        """Build the algorithm, refusing unknown hyperparameters with the list of valid ones."""
        unknown = sorted(set(hyperparameters) - set(cls.hyperparameters()))
        if unknown:
            valid = ", ".join(cls.hyperparameters()) or "none"
            raise DSTError(f"method={cls.name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                           f"valid ones: {valid}.")
        return cls(**hyperparameters)

    def bind(self, controller: DynamicSparsity) -> None:
        self.controller = controller

    # --- what a subclass implements or overrides -----------------------------------------------
    def reparameterize(self) -> None:
        """One reallocation. Must leave exactly `controller.budget` weights active."""
        raise NotImplementedError

    def check_schedule(self, schedule: UpdateSchedule) -> None:
        """Refuse a schedule the method cannot run (before the model is touched)."""

    def initial_sparsity(self, final: float) -> float:
        """The sparsity `apply` starts from (the target, except for gradual methods)."""
        return final

    def is_update_step(self, step: int) -> bool:
        """Whether a reallocation follows optimizer step `step` (1-based)."""
        return self.controller.schedule.is_update_step(step)

    def needs_dense_gradient(self, step: int) -> bool:
        """Whether the dense gradient of step `step` must be captured (DESIGN.md rule 6)."""
        return False

    def after_optimizer_step(self, step: int) -> None:
        """Called by `controller.step()` after every optimizer step, before any reallocation."""

    def metrics(self) -> dict:
        """Scalars recorded in `controller.history` at each update (threshold, drop fraction, ...)."""
        return {}

    def state_dict(self) -> dict:
        """What an exact resume needs beyond the step (schedules are pure functions of the step)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # --- bookkeeping ---------------------------------------------------------------------------
    @property
    def targets(self) -> list[SparseTarget]:
        return self.controller.targets

    @property
    def step(self) -> int:
        return self.controller.step_count

    def generator(self, layer: int) -> torch.Generator:
        """The generator for `layer` in the current update; depends only on (seed, update index, layer)."""
        seed = derive_seed(self.controller.seed, GROWTH_STREAM, self.controller.update_index, layer)
        return torch.Generator(device=self.targets[layer].mask.device).manual_seed(seed)

    def dense_gradients(self) -> list[torch.Tensor]:
        """The captured dense gradients of every target, averaged across ranks (consumed).

        A tensor no backward reached this step (an unused branch) gets a zero gradient.
        """
        grads = [sink.take() for sink in self.controller.dense_gradient_sinks]
        if all(g is None for g in grads):
            raise DSTError(f"method={self.name!r} grows by the dense gradient, but none was captured. Call "
                           f"dst.step() after every optimizer step, or dst.capture_dense_gradients() before the "
                           f"backward pass that precedes a manual dst.reparameterize().")
        grads = [torch.zeros(t.shape, device=t.mask.device) if g is None else g for g, t in zip(grads, self.targets)]
        all_reduce_mean(grads)
        return grads

    def prune(self, layer: int, groups: torch.Tensor) -> int:
        """Deactivate the active groups of `layer` at `groups` (bool, the grouping's group shape)."""
        return self._set(layer, groups, False)

    def grow(self, layer: int, groups: torch.Tensor) -> int:
        """Activate the inactive groups of `layer` at `groups`, starting at zero with zero optimizer state."""
        return self._set(layer, groups, True)

    def _set(self, layer: int, groups: torch.Tensor, active: bool) -> int:
        target = self.targets[layer]
        groups = groups & (target.group_mask().logical_not() if active else target.group_mask())
        positions = target.grouping.expand(groups)
        return self.set_indices(layer, positions.reshape(-1).nonzero().view(-1), active, positions)

    def set_indices(self, layer: int, indices: torch.Tensor, active: bool,
                    positions: torch.Tensor | None = None) -> int:
        """Activate (or deactivate) the weights of `layer` at flat `indices`, which must all change state.

        The fast path of `prune`/`grow` for callers that already hold exact indices (random growth,
        threshold pruning): no pass over the whole tensor.
        """
        target = self.targets[layer]
        count = indices.numel() // target.grouping.group_size
        if count:
            if positions is None and not target.mask.is_contiguous():
                positions = index_mask(indices, target.shape, target.mask.device)
            fill_positions(target.mask, indices, positions, active)
            zero_positions(target, indices, positions, unwrap_optimizer(self.controller.optimizer))
        self.controller.record_change(layer, **{"grown" if active else "pruned": count})
        return count

    def weakest_active(self, layer: int, count: int) -> torch.Tensor:
        """Flat indices of the `count` active groups of `layer` with the smallest mean `|w|` (ties: lower index)."""
        target = self.targets[layer]
        active = target.group_mask()
        weakest = top_k_indices((-target.scores(target.orig)).masked_fill(~active, float("-inf")), count)
        return weakest[active.reshape(-1)[weakest]]

    def regrow_in_blocks(self, layer: int, scores: torch.Tensor, candidates: torch.Tensor,
                         counts_from: torch.Tensor) -> torch.Tensor:
        """For `n:m`: in each block, as many of the best-scoring candidates as `counts_from` has in the block."""
        grouping = self.targets[layer].grouping
        block_scores = grouping.to_blocks(scores.float().masked_fill(~candidates, float("-inf")))
        chosen = top_k_per_block(block_scores, grouping.to_blocks(counts_from).sum(1))
        return grouping.from_blocks(chosen) & candidates

    def exchange(self, fraction: float, grow_scores: Callable[[int], torch.Tensor] | None,
                 grow_counts: Callable[[Sequence[int], Sequence[int]], list[int]] | None = None) -> None:
        """Drop and regrow: the core of SET, RigL, SNFS and GraNet's regeneration.

        Per layer, drop `floor(fraction * active)` of the active groups with the smallest magnitude (never
        the last one), then grow as many (or `grow_counts(dropped, room)`, for a redistribution across
        layers) at the inactive groups, just-dropped ones included, with the largest `grow_scores(layer)`
        (group scores), or at random (`grow_scores=None`, drawn in O(count)). A group dropped and regrown
        in the same update keeps its weights (RigL's default), so the counts recorded are the net
        changes. With `n:m` granularity each block regrows exactly what it dropped, so every block keeps
        `n` active weights.
        """
        drops, rooms = [], []
        for layer, target in enumerate(self.targets):
            active = target.active_groups()
            drops.append(self.weakest_active(layer, min(int(fraction * active), active - 1)))
            rooms.append(target.n_groups - active + drops[-1].numel())
        dropped = [d.numel() for d in drops]
        counts = grow_counts(dropped, rooms) if grow_counts else dropped
        for layer, target in enumerate(self.targets):
            grouping, drop = target.grouping, drops[layer]
            candidates = target.group_mask().logical_not().reshape(-1).index_fill_(0, drop, True)
            if grow_scores is None and grouping.kind != "n:m":
                grow = random_indices(candidates, counts[layer], self.generator(layer))
            else:
                scores = self.random_scores(layer) if grow_scores is None else grow_scores(layer).float()
                shaped = candidates.view(grouping.group_shape)
                if grouping.kind == "n:m":
                    dropped_here = index_mask(drop, grouping.group_shape, candidates.device)
                    grow = self.regrow_in_blocks(layer, scores, shaped, dropped_here).reshape(-1).nonzero().view(-1)
                else:
                    grow = top_k_indices(torch.where(shaped, scores, float("-inf")), counts[layer])
                    grow = grow[candidates[grow]]
            # A group dropped and drawn again keeps its weights: only the net changes are written.
            not_regrown = candidates.index_fill_(0, grow, False)  # (candidates is scratch from here on)
            pruned, grown = drop[not_regrown[drop]], grow[target.group_mask().reshape(-1)[grow].logical_not_()]
            if grouping.elementwise:  # exact already: no re-validation pass
                self.set_indices(layer, pruned, False)
                self.set_indices(layer, grown, True)
            else:
                self.prune(layer, index_mask(pruned, grouping.group_shape, target.mask.device))
                self.grow(layer, index_mask(grown, grouping.group_shape, target.mask.device))

    def random_scores(self, layer: int) -> torch.Tensor:
        """Uniform scores over the groups of `layer`, from the layer's generator."""
        target = self.targets[layer]
        return torch.rand(target.grouping.group_shape, generator=self.generator(layer), device=target.mask.device)

    def redistribute(self, dropped: Sequence[int], rooms: Sequence[int], shares: Sequence[float]) -> list[int]:
        """Split the total dropped across layers in proportion to `shares`, within each layer's room."""
        return apportion(sum(dropped), shares, rooms)
