"""When to reallocate and how much: pure functions of the optimizer step, so a resumed run is exact.

- `UpdateSchedule`: every `update_every` steps, the period doubling at given steps (DSR, Mostafa & Wang
  2019, sec. 4), none from `stop_step` on (RigL's `T_end = 0.75 * total_steps`).
- `decayed_fraction`: the drop fraction at a step, `cosine` (RigL, Evci et al. 2020, eq. 1:
  `f(t) = alpha / 2 * (1 + cos(pi * t / T_end))`; SNFS's prune rate), `linear`, `constant`, or a callable
  of your own, `factor(progress)` with `progress = t / T_end` in [0, 1] and the factor in [0, 1].
- `cubic_sparsity`: gradual pruning (Zhu & Gupta 2017, eq. 1:
  `s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt)) ** 3`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import DSTError

__all__ = ["DECAYS", "UpdateSchedule", "check_decay", "cubic_sparsity", "decayed_fraction"]

DECAYS = ("cosine", "linear", "constant")


def _positive_int(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DSTError(f"{argument} must be a positive integer (a number of optimizer steps); received {value!r}.")
    return value


@dataclass(frozen=True)
class UpdateSchedule:
    """Reallocate at step `s` (counting completed optimizer steps from 1) when `s % period(s) == 0`.

    Attributes:
        update_every: the period at the start of training.
        stop_step: no update at or after this step (`None`: never stop).
        double_at: steps from which the period doubles (once per entry), e.g. the DSR paper's epochs
            25, 80, 140 converted to steps.
    """

    update_every: int = 100
    stop_step: int | None = None
    double_at: Sequence[int] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _positive_int(self.update_every, "update_every")
        if self.stop_step is not None:
            _positive_int(self.stop_step, "stop_step")
        for step in self.double_at:
            _positive_int(step, "double_at")
        object.__setattr__(self, "double_at", tuple(sorted(self.double_at)))

    def period(self, step: int) -> int:
        """The reallocation period in force at `step`."""
        return self.update_every * 2 ** sum(step >= d for d in self.double_at)

    def is_update_step(self, step: int) -> bool:
        """Whether a reallocation follows the optimizer step numbered `step` (1-based)."""
        if step < 1 or (self.stop_step is not None and step >= self.stop_step):
            return False
        return step % self.period(step) == 0

    def state_dict(self) -> dict:
        return {"update_every": self.update_every, "stop_step": self.stop_step, "double_at": list(self.double_at)}


Decay = str | Callable[[float], float]


def _factor(decay: Callable[[float], float], progress: float) -> float:
    try:
        factor = decay(progress)
    except Exception as error:
        raise DSTError(f"decay={decay!r} failed at progress {progress} ({type(error).__name__}: {error}); a decay "
                       f"callable takes the progress in [0, 1] and returns a factor in [0, 1].") from None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 <= factor <= 1.0:
        raise DSTError(f"decay={decay!r} returned {factor!r} at progress {progress}; a decay callable returns a "
                       f"factor in [0, 1].")
    return float(factor)


def check_decay(decay: object) -> Decay:
    """`decay` if it is one of `DECAYS` or a callable returning factors in [0, 1] (checked at 0, 0.5 and 1)."""
    if callable(decay):
        for progress in (0.0, 0.5, 1.0):
            _factor(decay, progress)
        return decay
    if not isinstance(decay, str) or decay not in DECAYS:
        raise DSTError(f"decay={decay!r} is unknown; valid choices: {', '.join(DECAYS)}, or a callable "
                       f"factor(progress).")
    return decay


def decayed_fraction(initial: float, step: int, end: int | None, decay: Decay) -> float:
    """The fraction `initial` decayed from step 0 to zero at step `end` (constant if `end` is None)."""
    if decay == "constant" or end is None:
        return initial
    progress = min(max(step / end, 0.0), 1.0)
    if callable(decay):
        return initial * _factor(decay, progress)
    if decay == "cosine":
        return initial / 2 * (1 + math.cos(math.pi * progress))
    return initial * (1 - progress)


def cubic_sparsity(step: int, begin: int, end: int, initial: float, final: float) -> float:
    """The sparsity at `step` of gradual pruning from `initial` at `begin` to `final` at `end`."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - begin) / (end - begin)) ** 3
