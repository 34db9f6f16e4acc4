"""`DropAndGrow`: the shape of SET, RigL, SNFS and GraNet's regeneration, with the scores left to subclasses.

At every update each layer drops `floor(f(t) * active)` of its active groups with the lowest
`drop_scores` (never its last one) and grows as many (or `grow_counts`, for a redistribution across
layers) at the inactive groups, just-dropped ones included, with the highest `grow_scores`, or at
random when `grow_scores` returns None. `f(t)` is `drop_fraction` decayed by `decay` to zero at the stop
step (`schedules.decayed_fraction`; RigL's eq. 1 for `cosine`). A group dropped and regrown in the same
update keeps its weights (RigL's default), so the counts recorded are the net changes; new groups start
at zero. With `n:m` granularity each block regrows exactly what it dropped.

A new method is usually a few lines on this class:

    @dst_prune.register_method("gradient_times_weight")
    class GradientTimesWeight(dst_prune.DropAndGrow):
        def needs_dense_gradient(self, step): return self.is_update_step(step)
        def prepare(self): self.gradients = self.dense_gradients()
        def drop_scores(self, layer):
            target = self.targets[layer]
            return target.scores(target.orig * self.gradients[layer])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from .._scores import finite_scores
from .._selection import index_mask
from .._validation import check_choice, check_number
from ..schedules import DECAYS, decayed_fraction
from .base import SparseAlgorithm

__all__ = ["DropAndGrow"]


class DropAndGrow(SparseAlgorithm):
    """Drop the weakest groups of every layer and grow as many where `grow_scores` is highest.

    Args:
        drop_fraction: the initial fraction of each layer's active groups replaced per update.
        decay: how the fraction decays to zero at the stop step: `constant`, `cosine` or `linear`
            (default: the class's `default_decay`).
    """

    default_drop_fraction: ClassVar[float] = 0.3
    default_decay: ClassVar[str] = "constant"

    def __init__(self, drop_fraction: float | None = None, decay: str | None = None) -> None:
        super().__init__()
        fraction = self.default_drop_fraction if drop_fraction is None else drop_fraction
        self.drop_fraction = check_number(fraction, "drop_fraction", low=0.0, high=1.0)
        self.decay = check_choice(self.default_decay if decay is None else decay, "decay", DECAYS)

    @property
    def needs_total_steps(self) -> bool:  # a decaying fraction needs an end
        return self.decay != "constant"

    def current_drop_fraction(self) -> float:
        return decayed_fraction(self.drop_fraction, self.step, self.context.decay_end, self.decay)

    # --- what a subclass overrides -------------------------------------------------------------------
    def prepare(self) -> None:
        """Called at the start of every update, before any score is asked for (e.g. to fetch gradients)."""

    def drop_scores(self, layer: int) -> torch.Tensor:
        """One score per group of `layer`; the lowest active ones are dropped. Default: mean `|w|`."""
        return self.magnitudes(layer)

    def grow_scores(self, layer: int) -> torch.Tensor | None:
        """One score per group of `layer`; the highest inactive ones are grown. None (default): at random."""
        return None

    def grow_counts(self, dropped: Sequence[int], rooms: Sequence[int]) -> list[int]:
        """How many groups each layer grows, given how many it dropped and how many it can hold. Default: as
        many as it dropped."""
        return list(dropped)

    # --- the update --------------------------------------------------------------------------------
    def reparameterize(self) -> None:
        self.prepare()
        self.exchange(self.current_drop_fraction())

    def exchange(self, fraction: float) -> None:
        """Drop `floor(fraction * active)` groups per layer and grow as many (or `grow_counts`) back."""
        drops, rooms = [], []
        for layer, target in enumerate(self.targets):
            active = target.active_groups()
            drops.append(self.weakest_active(layer, min(int(fraction * active), active - 1),
                                             self.drop_scores(layer)))
            rooms.append(target.n_groups - active + drops[-1].numel())
        dropped = [d.numel() for d in drops]
        redistributes = all(t.grouping.redistributes for t in self.targets)
        counts = self.grow_counts(dropped, rooms) if redistributes else dropped
        for layer, target in enumerate(self.targets):
            grouping, drop = target.grouping, drops[layer]
            candidates = target.group_mask().logical_not().reshape(-1).index_fill_(0, drop, True)
            scores = self.grow_scores(layer)
            if scores is not None:
                scores = finite_scores(scores, target.name, "growth")
            grow = grouping.regrow(candidates, counts[layer], self.generator(layer), scores=scores, dropped=drop)
            # A group dropped and drawn again keeps its weights: only the net changes are written.
            not_regrown = candidates.index_fill_(0, grow, False)  # (candidates is scratch from here on)
            pruned, grown = drop[not_regrown[drop]], grow[target.group_mask().reshape(-1)[grow].logical_not_()]
            broken = self._non_finite(layer, drop[~not_regrown[drop]])  # regrown, but its weights are NaN/inf:
            pruned, grown = torch.cat([pruned, broken]), torch.cat([grown, broken])  # it restarts at zero
            if grouping.elementwise:  # exact already: no re-validation pass
                self.set_indices(layer, pruned, False)
                self.set_indices(layer, grown, True)
            else:
                self.prune(layer, index_mask(pruned, grouping.group_shape, target.mask.device))
                self.grow(layer, index_mask(grown, grouping.group_shape, target.mask.device))

    def _non_finite(self, layer: int, groups: torch.Tensor) -> torch.Tensor:
        """The flat group indices among `groups` of `layer` whose weights are not all finite."""
        target = self.targets[layer]
        if not groups.numel():
            return groups
        values = target.grouping.grouped(target.orig.detach()).reshape(target.grouping.n_groups, -1)[groups]
        return groups[~torch.isfinite(values).all(1)]

    def metrics(self) -> dict:
        return {"drop_fraction": self.current_drop_fraction()}
