"""`dst_prune.optim.SGD`: stochastic gradient descent with momentum (Polyak 1964; Nesterov as in Sutskever et al.,
ICML 2013), with compact momentum for sparse weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.sgd import sgd

from .compact import CompactStateOptimizer
from .hyperparameters import check_sgd

__all__ = ["SGD"]


class SGD(CompactStateOptimizer):
    """`torch.optim.SGD` with the momentum buffer of a sparse parameter kept over its active weights only.

    Same arguments, defaults and results as `torch.optim.SGD` (the update is torch's functional `sgd`);
    `differentiable` must stay False.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: momentum factor (0: no buffer is kept).
        dampening: dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and no dampening).
        maximize: maximize the objective.
        foreach, fused: torch's implementations to run the update with (default: torch's choice).
        free_gradients: step each parameter inside backward and free its gradient at once
            (`dst_prune.optim.in_backward`).
    """

    per_weight = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 free_gradients: bool = False) -> None:
        defaults = check_sgd(type(self).__name__, lr=lr, momentum=momentum, dampening=dampening,
                             weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, foreach=foreach,
                             differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, free_gradients=free_gradients)

    def init_state(self, group: dict, state: dict, like: torch.Tensor) -> None:
        """Nothing: torch's `sgd` makes the momentum buffer from the first gradient."""

    def has_state(self, group: dict, state: dict) -> bool:
        return group["momentum"] == 0 or "momentum_buffer" in state

    def update(self, group: dict, views: list) -> None:
        buffers = [v.state.get("momentum_buffer") for v in views]
        sgd([v.weights for v in views], [v.grad for v in views], buffers, has_sparse_grad=False,
                            foreach=group["foreach"], fused=group["fused"], grad_scale=None, found_inf=None,
                            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                            dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
        if group["momentum"] != 0:
            for view, buffer in zip(views, buffers):
                view.state["momentum_buffer"] = buffer
