"""Argument checks shared by `apply`, the algorithms and the schedules: each raises a `DSTError` naming the
argument, what was received and what was expected."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import DSTError

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "check_steps"]


def check_number(value: object, argument: str, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = True) -> float:
    """`value` as a float in the interval from `low` to `high` (closed at `low` and open at `high` by default).

    Raises:
        DSTError: not a real number (bools and strings included), not finite, or outside the interval.
    """
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if inside:
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not inside:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        if high == math.inf:
            expected = f"> {low:g}" if low_open else f">= {low:g}"
        else:
            expected = f"in {left}{low:g}, {high:g}{right}"
        raise DSTError(f"{argument} must be a number {expected}; received {value!r}.")
    return float(value)


def check_int(value: object, argument: str, *, minimum: int = 0, what: str = "") -> int:
    """`value` as an int `>= minimum`; `what` says what it counts (e.g. "a number of optimizer steps")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        detail = f" ({what})" if what else ""
        raise DSTError(f"{argument} must be {kind}{detail}; received {value!r}.")
    return value


def check_steps(values: object, argument: str) -> tuple[int, ...]:
    """A sequence of positive step numbers (e.g. `double_at`), as a sorted tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise DSTError(f"{argument} must be a list of positive integers (optimizer steps), e.g. [1000, 5000]; "
                       f"received {values!r}.")
    return tuple(sorted(check_int(v, argument, minimum=1, what="a number of optimizer steps") for v in values))


def check_choice(value: object, argument: str, choices: Sequence[str]) -> str:
    """`value` if it is one of `choices`; else a DSTError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise DSTError(f"{argument}={value!r} is unknown; valid choices: {', '.join(choices)}.")
    return value


def check_bool(value: object, argument: str) -> bool:
    if not isinstance(value, bool):
        raise DSTError(f"{argument} must be True or False; received {value!r}.")
    return value
