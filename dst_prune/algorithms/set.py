"""Sparse Evolutionary Training (Mocanu et al., Nature Communications 2018)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .drop_and_grow import DropAndGrow
from .registry import register_method

__all__ = ["SET"]


@register_method("set")
@dataclasses.dataclass(eq=False, kw_only=True)
class SET(DropAndGrow):
    """SET: per layer, drop the weakest active weights and regrow as many at random, at zero.

    Mocanu et al. 2018, Algorithm 1: after each training period, remove a fraction `zeta` of the
    active weights closest to zero (here: the smallest `|w|`, as RigL's reimplementation does) and add
    the same number of new connections at random inactive positions of the same layer.

    Args:
        drop_fraction: `zeta`, the fraction of each layer's active weights replaced per update (0.3).
        decay: `constant` as in the paper; `cosine` or `linear` decay it to zero at the stop step.
    """

    drop_fraction: float = 0.3
    decay: str | Callable[[float], float] = "constant"
