"""`DropAndGrow`: the shape of SET, RigL, SNFS and GraNet's regeneration, with the scores left to subclasses.

At every update each layer drops `floor(f(t) * active)` of its active groups with the lowest
`drop_scores` (never its last one) and grows as many (or `grow_counts`, for a redistribution across
layers) at the inactive groups, just-dropped ones included, with the highest `grow_scores`, or at
random when `grow_scores` returns None. `f(t)` is `drop_fraction` decayed by `decay` to zero at the stop
step (`schedules.decayed_fraction`; RigL's eq. 1 for `cosine`). A group dropped and regrown in the same
update keeps its weights (RigL's default), so the counts recorded are the net changes; new groups start
at zero. With `n:m` granularity each block regrows exactly what it dropped.

A method that grows by the dense gradient says so (`grows_by = "gradient"`): the base class then captures
`dL/dW` on the step before each update (averaged across ranks, non-finite entries as zero), hands it over
as `self.gradients` while the update runs, grows where it is largest, and frees it afterwards. A new
method is usually a few lines on this class:

    @dst_prune.register_method("gradient_times_weight")
    class GradientTimesWeight(dst_prune.DropAndGrow):
        grows_by = "gradient"

        def drop_scores(self, layer):
            target = self.targets[layer]
            return target.scores(target.orig * self.gradients[layer])
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from .._masking.target import SparseTarget
from .._scores import finite_scores
from .._selection import Outside, ascending, contains, index_mask, random_indices, top_k_indices, top_k_outside
from .._validation import check_number
from ..errors import DSTError
from ..groups import Grouping
from ..schedules import check_decay, decayed_fraction
from .base import SparseAlgorithm

__all__ = ["DropAndGrow"]


@dataclasses.dataclass(eq=False, kw_only=True)
class DropAndGrow(SparseAlgorithm):
    """Drop the weakest groups of every layer and grow as many where `grow_scores` is highest.

    Args:
        drop_fraction: the initial fraction of each layer's active groups replaced per update.
        decay: how the fraction decays to zero at the stop step: `constant`, `cosine`, `linear`, or a
            callable `f(progress) -> factor` (progress from 0 to 1; the factor in [0, 1]).
    """

    #: what growth ranks by: None (random, or the method's own `grow_scores`) or "gradient" (the dense gradient
    #: of the step before each update: captured, handed over as `self.gradients`, freed by the base class)
    grows_by: ClassVar[str | None] = None

    drop_fraction: float = 0.3
    decay: str | Callable[[float], float] = "constant"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("drop_fraction", "decay"):
            self._take_default(name)
        self.drop_fraction = check_number(self.drop_fraction, "drop_fraction", low=0.0, high=1.0)
        self.decay = check_decay(self.decay)
        if self.grows_by not in (None, "gradient"):
            raise DSTError(f"{type(self).__name__}.grows_by must be None or 'gradient'; it is {self.grows_by!r}.")
        self.gradients: list | None = None

    def _take_default(self, name: str) -> None:
        """None (from a method's own `__init__`) means the default; a `default_<name>` class attribute (the way
        dst_prune 0.2 declared defaults) still sets it, with a DeprecationWarning."""
        default = _field_default(type(self), name)
        legacy = getattr(type(self), f"default_{name}", None)
        if legacy is not None and getattr(self, name) in (None, default):
            warnings.warn(f"{type(self).__name__}.default_{name} is deprecated: declare the field instead "
                          f"({name}: ... = {legacy!r} on a @dataclasses.dataclass(eq=False, kw_only=True) class).",
                          DeprecationWarning, stacklevel=4)
            setattr(self, name, legacy)
        elif getattr(self, name) is None:
            setattr(self, name, default)

    @property
    def needs_total_steps(self) -> bool:  # a decaying fraction needs an end
        return self.decay != "constant"

    def current_drop_fraction(self) -> float:
        return decayed_fraction(self.drop_fraction, self.step, self.context.decay_end, self.decay)

    def needs_dense_gradient(self, step: int) -> bool:
        return self.grows_by == "gradient" and self.is_update_step(step)

    # --- what a subclass overrides -------------------------------------------------------------------
    def prepare(self) -> None:
        """Called at the start of every update, before any score is asked for (e.g. to fetch gradients)."""

    def drop_scores(self, layer: int) -> torch.Tensor:
        """One score per group of `layer`; the lowest active ones are dropped. Default: mean `|w|`."""
        return self.magnitudes(layer)

    def grow_scores(self, layer: int) -> torch.Tensor | None:
        """One score per group of `layer`; the highest inactive ones are grown. Default: the dense gradient's
        mean `|dL/dW|` when `grows_by = "gradient"`, else None (at random)."""
        if self.grows_by == "gradient":
            return self.targets[layer].scores(self.gradients[layer])
        return None

    def grow_counts(self, dropped: Sequence[int], rooms: Sequence[int]) -> list[int]:
        """How many groups each layer grows, given how many it dropped and how many it can hold. Default: as
        many as it dropped."""
        return list(dropped)

    # --- the update --------------------------------------------------------------------------------
    def reparameterize(self) -> None:
        if self.grows_by == "gradient":
            self.gradients = self.dense_gradients()
        try:
            self.prepare()
            self.exchange(self.current_drop_fraction())
        finally:
            self.gradients = None  # a dense gradient per tensor: never kept between updates

    def exchange(self, fraction: float) -> None:
        """Drop `floor(fraction * active)` groups per layer and grow as many (or `grow_counts`) back."""
        drops, rooms, actives = [], [], []
        for layer, target in enumerate(self.targets):
            if self._drops_by_magnitude(layer):
                drop, active = self._weakest_by_magnitude(layer, fraction)
            else:
                active = target.active_groups()
                drop = self.weakest_active(layer, min(int(fraction * active), active - 1),
                                           self._checked(self.drop_scores(layer), layer, "drop_scores"))
            drops.append(drop)
            actives.append(active)
            rooms.append(target.n_groups - active + drop.numel())
        dropped = [d.numel() for d in drops]
        redistributes = all(t.grouping.redistributes for t in self.targets)
        counts = self._checked_counts(self.grow_counts(dropped, rooms), dropped, rooms) if redistributes else dropped
        for layer, target in enumerate(self.targets):
            grouping, drop = target.grouping, drops[layer]
            scores = self.grow_scores(layer)
            if scores is not None:
                scores = finite_scores(self._checked(scores, layer, "grow_scores"), target.name, "growth")
            if type(grouping).regrow is Grouping.regrow and 16 * drop.numel() <= target.n_groups:
                # the inactive groups and the dropped, never materialized (a few percent of them change)
                candidates = Outside(target.group_mask(), also=drop, active=actives[layer])
                grow = (random_indices(candidates, counts[layer], self.generator(layer)) if scores is None else
                        top_k_outside(scores, counts[layer], candidates))
                regrown = contains(ascending(grow[contains(ascending(drop), grow)]), drop)
            else:
                candidates = target.group_mask().logical_not().reshape(-1).index_fill_(0, drop, True)
                grow = grouping.regrow(candidates, counts[layer], self.generator(layer), scores=scores, dropped=drop)
                regrown = candidates.index_fill_(0, grow, False)[drop].logical_not_()
            # A group dropped and drawn again keeps its weights: only the net changes are written.
            pruned, grown = drop[~regrown], grow[target.group_mask().reshape(-1)[grow].logical_not_()]
            broken = self._non_finite(layer, drop[regrown])  # regrown, but its weights are NaN/inf:
            pruned, grown = torch.cat([pruned, broken]), torch.cat([grown, broken])  # it restarts at zero
            if grouping.elementwise:  # exact already: no re-validation pass
                self.set_indices(layer, pruned, False)
                self.set_indices(layer, grown, True)
            else:
                self.prune(layer, index_mask(pruned, grouping.group_shape, target.mask.device))
                self.grow(layer, index_mask(grown, grouping.group_shape, target.mask.device))

    def _drops_by_magnitude(self, layer: int) -> bool:
        """Whether `layer` drops by the default `|w|` of single weights (nothing overridden), which
        `_weakest_by_magnitude` ranks among the active weights only (when they are at most a quarter)."""
        cls, target = type(self), self.targets[layer]
        return (target.grouping.elementwise and 4 * self.context.active_groups(layer) <= target.n_groups
                and cls.drop_scores is DropAndGrow.drop_scores
                and cls.weakest_active is SparseAlgorithm.weakest_active
                and cls.magnitudes is SparseAlgorithm.magnitudes and type(target).scores is SparseTarget.scores
                and type(target.grouping).reduce is Grouping.reduce)

    def _weakest_by_magnitude(self, layer: int, fraction: float) -> tuple[torch.Tensor, int]:
        """`(weakest, active)`: what `weakest_active(layer, floor(fraction * active))` returns with the default
        scores, and the number of active weights, ranking the active weights only (a tenth of the tensor at 90%
        sparsity) instead of a full-size `|w|` masked with `-inf`: the same indices, ties to the lower one."""
        target = self.targets[layer]
        active_indices = target.mask.reshape(-1).nonzero().view(-1)
        active = active_indices.numel()
        magnitudes = finite_scores(target.orig.detach().reshape(-1).index_select(0, active_indices).abs_(), target.name)
        weakest = top_k_indices(magnitudes.neg_(), min(int(fraction * active), active - 1))
        return active_indices.index_select(0, weakest), active

    def _checked(self, scores: object, layer: int, what: str) -> torch.Tensor:
        """`scores` if it is one score per group of `layer` (a wrong shape would broadcast into wrong positions)."""
        target = self.targets[layer]
        shape = tuple(getattr(scores, "shape", ()))
        if not isinstance(scores, torch.Tensor) or shape != tuple(target.grouping.group_shape):
            raise DSTError(f"method={self.name!r}: {what}({layer}) for {target.name} returned "
                           f"{type(scores).__name__} of shape {shape}; one score per group is expected, shape "
                           f"{tuple(target.grouping.group_shape)} (target.scores(tensor) gives it).")
        return scores

    def _checked_counts(self, counts: object, dropped: Sequence[int], rooms: Sequence[int]) -> list[int]:
        """`grow_counts`' result, if it regrows exactly what was dropped, within each layer's room."""
        valid = isinstance(counts, (list, tuple)) and len(counts) == len(dropped) and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= room for c, room in zip(counts, rooms))
        if not valid or sum(counts) != sum(dropped):
            raise DSTError(f"method={self.name!r}: grow_counts(dropped={list(dropped)}, rooms={list(rooms)}) returned "
                           f"{counts!r}; expected {len(dropped)} integers, each between 0 and its layer's room, "
                           f"summing to the {sum(dropped)} groups dropped.")
        return list(counts)

    def _non_finite(self, layer: int, groups: torch.Tensor) -> torch.Tensor:
        """The flat group indices among `groups` of `layer` whose weights are not all finite."""
        target = self.targets[layer]
        if not groups.numel():
            return groups
        values = target.grouping.grouped(target.orig.detach()).reshape(target.grouping.n_groups, -1)[groups]
        return groups[~torch.isfinite(values).all(1)]

    def metrics(self) -> dict:
        return {"drop_fraction": self.current_drop_fraction()}


def _field_default(cls: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)
