"""The optimizer's side of a mask change: finding the `torch.optim.Optimizer` and its per-weight state."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .errors import DSTError

if TYPE_CHECKING:
    from ._masking.target import SparseTarget

__all__ = ["Optimizers", "adopt_optimizer", "optimizer_state_like", "require_optimizer", "unwrap_optimizer"]

logger = logging.getLogger(__name__)


class Optimizers:
    """Several optimizers seen as one (`dst.optimizer = [opt_a, opt_b]`): their parameter groups, and the state
    each keeps for its own parameters.

    Attributes:
        optimizers: the unwrapped `torch.optim.Optimizer`s.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = tuple(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer | Optimizers | None:
    """The innermost `torch.optim.Optimizer` inside wrappers (accelerate's `AcceleratedOptimizer`, which is an
    `Optimizer` subclass itself, Lightning's `LightningOptimizer`); for a list or tuple of them, `Optimizers`
    (None if any is not an optimizer)."""
    if isinstance(optimizer, (list, tuple)):
        inner = [unwrap_optimizer(o) for o in optimizer]
        if not inner or any(not isinstance(o, torch.optim.Optimizer) for o in inner):
            return None
        return Optimizers(inner)
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def require_optimizer(optimizer: object) -> torch.optim.Optimizer | Optimizers | None:
    """The `torch.optim.Optimizer` in `optimizer` (None for None; `Optimizers` for a list or tuple of them);
    DSTError for anything else."""
    inner = unwrap_optimizer(optimizer)
    if optimizer is not None and inner is None:
        received = (f"a {type(optimizer).__name__} of " + ", ".join(type(o).__name__ for o in optimizer)
                    if isinstance(optimizer, (list, tuple)) and optimizer else type(optimizer).__name__)
        raise DSTError(f"optimizer must be a torch.optim.Optimizer (or a wrapper of one, such as accelerate's); "
                       f"received {received}. Several optimizers go in a non-empty list or tuple.")
    return inner


def optimizer_state_like(optimizer: torch.optim.Optimizer | Optimizers | None,
                         param: torch.Tensor) -> list[torch.Tensor]:
    """Every state tensor the optimizer (each of `Optimizers`) keeps for `param` with `param`'s shape (momenta,
    moments, ...)."""
    if optimizer is None:
        return []
    optimizers = optimizer.optimizers if isinstance(optimizer, Optimizers) else (optimizer,)
    return [v for o in optimizers for v in o.state.get(param, {}).values()
            if isinstance(v, torch.Tensor) and v.shape == param.shape]


def adopt_optimizer(optimizer: object, targets: Sequence[SparseTarget]) -> None:
    """Check `optimizer` for the controller of `targets` (a warning for each sparse parameter it does not hold: its
    state cannot be reset when it is pruned) and let a `dst_prune.optim` optimizer track the targets' masks (state
    at the active weights only).

    Raises:
        DSTError: `optimizer` is not an optimizer (`require_optimizer`).
    """
    inner = require_optimizer(optimizer)
    if inner is None:
        return
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    missing = [t.name for t in targets if id(t.param) not in held]
    if missing:
        logger.warning("the optimizer does not hold %d sparse parameters (e.g. %s); their state cannot be reset when "
                       "they are pruned", len(missing), missing[0])
    for each in inner.optimizers if isinstance(inner, Optimizers) else [inner]:
        track = getattr(each, "track_sparse_targets", None)
        if callable(track):
            track(targets)
