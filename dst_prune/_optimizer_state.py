"""The optimizer's side of a mask change: finding the `torch.optim.Optimizer` and its per-weight state."""

from __future__ import annotations

import torch

from .errors import DSTError

__all__ = ["optimizer_state_like", "require_optimizer", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer | None:
    """The innermost `torch.optim.Optimizer` inside wrappers (accelerate's `AcceleratedOptimizer`, which is an
    `Optimizer` subclass itself, Lightning's `LightningOptimizer`)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def require_optimizer(optimizer: object) -> torch.optim.Optimizer | None:
    """The `torch.optim.Optimizer` in `optimizer` (None for None); DSTError for anything else."""
    inner = unwrap_optimizer(optimizer)
    if optimizer is not None and inner is None:
        raise DSTError(f"optimizer must be a torch.optim.Optimizer (or a wrapper of one, such as accelerate's); "
                       f"received {type(optimizer).__name__}.")
    return inner


def optimizer_state_like(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> list[torch.Tensor]:
    """Every state tensor the optimizer keeps for `param` with `param`'s shape (momenta, moments, ...)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]
