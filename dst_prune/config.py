"""`SparsityConfig`: the arguments of `dst_prune.apply`, validated once, and the rules that follow from them.

It owns argument validation (every check runs before the model is touched), the stop-step rule (the
only place it is written) and the resume rule: which fields of a saved controller state must equal
the new arguments and which ones the new arguments may change.

The resume rule, for a controller state loaded into a controller built with other arguments
(`DynamicSparsity.load_state_dict` applies it):

- **refused** (a `DSTError` naming the field, the saved and the new value): the fields that define
  the sparse model, `method`, `sparsity`, `granularity`, `distribution` and `seed` (and the sparse
  tensors themselves, checked with the masks). Loading would give a model other than the one asked for.
- **taken from the new arguments, and logged**: the fields that only shape the rest of training,
  `update_every`, `stop_step`/`stop_fraction`, `double_at` (the schedule), `total_steps` and the method's
  hyperparameters (`drop_fraction`, `decay`, DSR's `target_fraction_to_prune`, ...). A resumed run with
  the same arguments is exact; one with new values continues with them from the saved step. The method's
  state (DSR's current threshold, SNFS's momentum) is always the saved one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace

from ._validation import check_bool, check_choice, check_int, check_number, check_steps
from .budget.distributions import DISTRIBUTIONS
from .budget.initialization import INITS
from .errors import DSTError
from .schedules import UpdateSchedule
from .targets import NameFilter

__all__ = ["ADJUSTABLE_FIELDS", "IDENTITY_FIELDS", "SparsityConfig", "describe"]

#: fields a resumed state must share with the new arguments (refused otherwise)
IDENTITY_FIELDS = ("method", "sparsity", "granularity", "distribution", "seed")
#: fields the new arguments may change on resume (the new value is used and logged)
ADJUSTABLE_FIELDS = ("schedule", "total_steps", "hyperparameters")


def describe(value: object) -> object:
    """A plain, comparable stand-in for an argument value: a callable by its qualified name."""
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    return value


@dataclass(frozen=True)
class SparsityConfig:
    """What `dst_prune.apply` was asked for (see its docstring for each field), validated.

    Attributes:
        method: the registered name of the method (`SparseAlgorithm.name`).
        hyperparameters: the method's own arguments as given (the method's defaults fill the rest).
        loaded: made by `load_sparse_state_dict` from a checkpoint's masks (no distribution was chosen).
    """

    sparsity: float
    method: str = "dsr"
    distribution: str | Callable = "uniform"
    include: NameFilter = None
    exclude: NameFilter = None
    dense_stem_and_head: bool = True
    init: str = "magnitude"
    granularity: str = "element"
    update_every: int = 100
    total_steps: int | None = None
    stop_fraction: float | None = None
    stop_step: int | None = None
    double_at: tuple[int, ...] = ()
    seed: int = 0
    hyperparameters: Mapping[str, object] = field(default_factory=dict)
    loaded: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # (frozen: normalised values are set once, here)
        set_(self, "sparsity", check_number(self.sparsity, "sparsity", low=0.0, high=1.0))
        if not callable(self.distribution):
            check_choice(self.distribution, "distribution", DISTRIBUTIONS)
        check_choice(self.init, "init", INITS)
        check_bool(self.dense_stem_and_head, "dense_stem_and_head")
        check_int(self.update_every, "update_every", minimum=1, what="a number of optimizer steps")
        if self.total_steps is not None and (isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int)
                                             or self.total_steps < 1):
            raise DSTError(f"total_steps must be None or a positive integer; received {self.total_steps!r}.")
        if self.stop_fraction is not None:
            check_number(self.stop_fraction, "stop_fraction", low=0.0, high=1.0, low_open=True, high_open=False)
        if self.stop_step is not None:
            check_int(self.stop_step, "stop_step", minimum=1, what="a number of optimizer steps")
        set_(self, "double_at", check_steps(self.double_at, "double_at"))
        set_(self, "seed", check_int(self.seed, "seed"))
        set_(self, "hyperparameters", dict(self.hyperparameters))

    # --- the stop-step rule ----------------------------------------------------------------------------
    def stop(self, default_fraction: float | None) -> int | None:
        """The step reallocation stops at: `stop_step`, else `stop_fraction` (or the method's default fraction)
        of `total_steps`, else never (None)."""
        if self.stop_step is not None:
            return self.stop_step
        fraction = self.stop_fraction if self.stop_fraction is not None else default_fraction
        if fraction is None or self.total_steps is None:
            return None
        return max(1, round(fraction * self.total_steps))

    def schedule(self, default_fraction: float | None) -> UpdateSchedule:
        """When updates happen: every `update_every` steps, doubling at `double_at`, none from the stop step."""
        return UpdateSchedule(update_every=self.update_every, stop_step=self.stop(default_fraction),
                              double_at=self.double_at)

    def with_total_steps(self, total_steps: int) -> SparsityConfig:
        """The same configuration for a training of `total_steps` optimizer steps."""
        return replace(self, total_steps=check_int(total_steps, "total_steps", minimum=1,
                                                  what="the number of optimizer steps of training"))

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every field as plain values (callables by name), for a controller checkpoint."""
        return {f.name: describe(getattr(self, f.name)) for f in fields(self)}
