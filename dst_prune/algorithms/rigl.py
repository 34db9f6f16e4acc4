"""Rigging the Lottery, RigL (Evci et al., ICML 2020)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .registry import register_method
from .set import SET

__all__ = ["RigL"]


@register_method("rigl")
@dataclasses.dataclass(eq=False, kw_only=True)
class RigL(SET):
    """RigL: SET with growth where the dense gradient `|dL/dW|` is largest.

    Evci et al. 2020, sec. 3: every `update_every` steps (100) until `T_end = stop_fraction * total_steps`
    (0.75), each layer drops `f(t) * active` weights with the smallest `|w|` and grows as many inactive
    connections with the largest `|dL/dW|`, initialised to zero, with `f(t) = alpha / 2 * (1 + cos(pi t /
    T_end))` (eq. 1, `alpha = drop_fraction = 0.3`). The dense gradient is captured only on the step
    before each update (masking rule 6 (docs/design.md)) and averaged across ranks.

    Args:
        drop_fraction: `alpha`, the initial fraction of each layer's active weights replaced (0.3).
        decay: `cosine` (the paper), `linear` or `constant`.
    """

    grows_by = "gradient"
    default_stop_fraction = 0.75

    decay: str | Callable[[float], float] = "cosine"
