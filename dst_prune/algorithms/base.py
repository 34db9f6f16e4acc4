"""`SparseAlgorithm`: the base of every DST method; a method decides what to rank by, the base does the rest.

An algorithm is bound to a `SparsityContext` (the sparse tensors, budget, step, seed, optimizer), not
to the controller. It writes masks only through `prune`, `grow` and `set_indices`, which keep the
invariants of `docs/design.md` (zeroed weights, gradients and optimizer state at pruned and regrown
positions) and record every change for the undo log of the update. Random choices come from
`generator(layer)`, seeded from `(seed, update index, layer)` only, so every rank of a distributed run and
every resumed run draws the same masks.

A method's hyperparameters are the fields of a dataclass (`@dataclasses.dataclass(eq=False, kw_only=True)`
on the class): each is declared once, with its default, and `hyperparameters()` lists them; validation
goes in `__post_init__`. A method may instead write its own `__init__` (its keyword arguments are then its
hyperparameters).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import torch

from .._masking.target import SparseTarget
from .._scores import finite_scores
from .._selection import top_k_indices
from ..errors import DSTError
from ..schedules import UpdateSchedule
from .context import SparsityContext

__all__ = ["SparseAlgorithm"]


@dataclasses.dataclass(eq=False, kw_only=True)
class SparseAlgorithm:
    """Base class of the DST algorithms (`method=` of `dst_prune.apply`).

    A subclass declares its hyperparameters as dataclass fields (validated in `__post_init__`, before the
    model is touched), implements `reparameterize`, and may override the schedule hooks below. Register
    it with `dst_prune.register_method(name)` to make it available by name.
    """

    name: ClassVar[str] = ""
    #: the `SparsityContext` it works on, once bound (`apply` binds it)
    context = None
    #: starts denser and prunes to the target on its own schedule (GMP, GraNet)
    gradual: ClassVar[bool] = False
    #: stop reallocating at this fraction of `total_steps` unless `stop_fraction`/`stop_step` is given
    default_stop_fraction: ClassVar[float | None] = None
    #: whether its schedule cannot run without `total_steps` (or an explicit `stop_step`)
    needs_total_steps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.context: SparsityContext | None = None

    @classmethod
    def _own_init(cls) -> bool:
        """Whether the class (or a base below its nearest dataclass) writes its own `__init__`."""
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                return "__dataclass_fields__" not in vars(klass)
        return False

    @classmethod
    def hyperparameters(cls) -> list[str]:
        """The names of the method's hyperparameters (its dataclass fields, or its own `__init__`'s arguments)."""
        if cls._own_init():
            return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def defaults(cls) -> dict[str, object]:
        """`{hyperparameter: default}` of a dataclass method (what the docs' table of defaults shows)."""
        if cls._own_init():
            return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {f.name: f.default for f in dataclasses.fields(cls) if f.init and f.default is not dataclasses.MISSING}

    def hyperparameter_values(self) -> dict[str, object]:
        """The hyperparameters this instance runs with (recorded in checkpoints)."""
        return {name: getattr(self, name) for name in self.hyperparameters() if hasattr(self, name)}

    @classmethod
    def create(cls, **hyperparameters: object) -> SparseAlgorithm:
        """Build the algorithm, refusing unknown hyperparameters with the list of valid ones."""
        unknown = sorted(set(hyperparameters) - set(cls.hyperparameters()))
        if unknown:
            valid = ", ".join(cls.hyperparameters()) or "none"
            raise DSTError(f"method={cls.name or cls.__name__!r} has no hyperparameter "
                           f"{', '.join(map(repr, unknown))}; valid ones: {valid}.")
        return cls(**hyperparameters)

    def bind(self, context: SparsityContext) -> None:
        """Attach to the sparse model's context (once, by `apply`)."""
        self.context = context

    # --- what a subclass implements or overrides -----------------------------------------------
    def reparameterize(self) -> None:
        """One reallocation. Must leave exactly `context.budget` groups active."""
        raise NotImplementedError

    def check_schedule(self, schedule: UpdateSchedule) -> None:
        """Refuse a schedule the method cannot run (before the model is touched)."""

    def starting_sparsity(self, final: float) -> float:
        """The sparsity `apply` starts from (the target, except for gradual methods)."""
        return final

    def initial_groups(self, specs: list, groupings: list, scores: list[torch.Tensor],
                       chosen: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reshape the initial masks `apply` chose (bool, group shape; same total) into the method's pattern.

        Called before the model is touched, so a `DSTError` here leaves it as it was. Default: as chosen.

        Args:
            specs: the targets (`TargetSpec`: name, layout), for messages and output dimensions.
            groupings: their groupings (`granularity`).
            scores: what `init` ranks by (mean `|w|`, or noise for `random`), one per target, group shape.
            chosen: the distribution's initial active groups, one bool tensor per target.
        """
        return chosen

    def next_budget(self) -> int:
        """The exact number of active groups after the coming update (constant, except for gradual methods)."""
        return self.context.budget

    def check_ready(self) -> None:
        """Raise a `DSTError` if an update cannot start now (e.g. DSR between its steps)."""

    def is_update_step(self, step: int) -> bool:
        """Whether a reallocation follows optimizer step `step` (1-based)."""
        return self.context.schedule.is_update_step(step)

    def needs_dense_gradient(self, step: int) -> bool:
        """Whether the dense gradient of step `step` must be captured (masking rule 6 (docs/design.md))."""
        return False

    def after_optimizer_step(self, step: int) -> None:
        """Called by `controller.step()` after every optimizer step, before any reallocation."""

    def metrics(self) -> dict:
        """Scalars recorded in `controller.history` at each update (threshold, drop fraction, ...)."""
        return {}

    def state_dict(self) -> dict:
        """What an exact resume needs beyond the step (schedules are pure functions of the step)."""
        return {}

    def check_state(self, state: dict) -> None:
        """Raise a `DSTError` if `state` cannot be loaded (called before anything is changed)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; `check_state` has accepted it."""

    def snapshot(self) -> dict:
        """What `restore` needs to undo a failed update (a shallow copy of the attributes).

        Enough for algorithms that assign new objects during an update; one that changes a tensor in
        place inside `reparameterize` must copy it here.
        """
        return dict(vars(self))

    def restore(self, snapshot: dict) -> None:
        for key in set(vars(self)) - set(snapshot):
            delattr(self, key)
        vars(self).update(snapshot)

    # --- helpers for subclasses ----------------------------------------------------------------
    @property
    def targets(self) -> list[SparseTarget]:
        return self.context.targets

    @property
    def step(self) -> int:
        return self.context.step

    def generator(self, layer: int) -> torch.Generator:
        return self.context.generator(layer)

    def dense_gradients(self) -> list[torch.Tensor]:
        """The captured dense gradients (finite, averaged across ranks), consumed."""
        return self.context.dense_gradients(self.name)

    def magnitudes(self, layer: int) -> torch.Tensor:
        """The mean `|w|` of every group of `layer`; non-finite weights score lowest (`dst_prune._scores`)."""
        target = self.targets[layer]
        return finite_scores(target.scores(target.orig), target.name)

    def prune(self, layer: int, groups: torch.Tensor) -> int:
        """Deactivate the active groups of `layer` at `groups` (bool, the grouping's group shape)."""
        return self.context.set_groups(layer, groups, False)

    def grow(self, layer: int, groups: torch.Tensor) -> int:
        """Activate the inactive groups of `layer` at `groups`, starting at zero with zero optimizer state."""
        return self.context.set_groups(layer, groups, True)

    def set_indices(self, layer: int, indices: torch.Tensor, active: bool,
                    positions: torch.Tensor | None = None) -> int:
        """The fast path of `prune`/`grow` for exact flat element indices that all change state."""
        return self.context.set_indices(layer, indices, active, positions)

    def weakest_active(self, layer: int, count: int, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Flat indices of the `count` active groups of `layer` with the lowest `scores` (default: magnitude;
        ties: lower index)."""
        active = self.targets[layer].group_mask()
        name = self.targets[layer].name
        scores = self.magnitudes(layer) if scores is None else finite_scores(scores, name, "drop")
        weakest = top_k_indices(scores.neg().masked_fill_(~active, float("-inf")), count)
        return weakest[active.reshape(-1)[weakest]]
