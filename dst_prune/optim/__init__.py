"""Optimizers whose per-weight state covers only the active weights of sparse parameters.

    opt = dst_prune.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    dst = dst_prune.apply(model, sparsity=0.9, optimizer=opt)

`SGD`, `Adam` and `AdamW` take torch's arguments and give torch's results; a sparse parameter's state is 1-D
over its active weights, remapped when the mask changes. `free_gradients=True` also steps each parameter inside
backward and frees its gradient at once. `create(name, params, **kwargs)` picks one by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import DSTError
from .adam import Adam
from .adamw import AdamW
from .compact import CompactStateOptimizer
from .in_backward import SpentGradient
from .sgd import SGD

__all__ = ["OPTIMIZERS", "SGD", "Adam", "AdamW", "CompactStateOptimizer", "SpentGradient", "create"]

OPTIMIZERS: dict[str, type[CompactStateOptimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def create(name: str, params: Iterable, **kwargs: object) -> CompactStateOptimizer:
    """The compact optimizer `name` (`sgd`, `adam`, `adamw`; any case) over `params`, with torch's arguments.

    Raises:
        DSTError: an unknown name (the message lists the known ones) or a bad argument.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise DSTError(f"unknown optimizer {name!r}; dst_prune.optim has {', '.join(OPTIMIZERS)}.")
    try:
        return OPTIMIZERS[key](params, **kwargs)
    except TypeError as error:  # an argument the optimizer does not take
        raise DSTError(f"dst_prune.optim.create({name!r}, ...): {error}") from None
