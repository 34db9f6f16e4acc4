"""`dst_prune.optim.Adam`: Adam (Kingma & Ba, ICLR 2015, Algorithm 1) with compact state for sparse weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.adam import adam
from torch.optim.adamw import adamw

from .compact import CompactStateOptimizer
from .hyperparameters import check_adam

__all__ = ["Adam"]


def scalar_dtype(fused: bool | None) -> torch.dtype:
    """The dtype torch's Adam keeps `step` in."""
    return torch.float32 if fused or torch.get_default_dtype() != torch.float64 else torch.float64


class Adam(CompactStateOptimizer):
    """`torch.optim.Adam` with the moments of a sparse parameter kept over its active weights only.

    Same arguments, defaults and results as `torch.optim.Adam` (the update is torch's functional `adam`);
    `capturable` and `differentiable` must stay False.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: the decay rates of the first and second moment estimates.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient (decoupled, as in AdamW, with `decoupled_weight_decay`).
        amsgrad: keep the maximum of the second moments (Reddi et al., ICLR 2018).
        foreach, fused: torch's implementations to run the update with (default: torch's choice).
        maximize: maximize the objective.
        decoupled_weight_decay: decay the weights directly (AdamW; Loshchilov & Hutter, ICLR 2019).
        free_gradients: step each parameter inside backward and free its gradient at once
            (`dst_prune.optim.in_backward`).
    """

    per_weight = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 free_gradients: bool = False) -> None:
        defaults = check_adam(type(self).__name__, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              amsgrad=amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
                              differentiable=differentiable, fused=fused,
                              decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, free_gradients=free_gradients)

    def init_state(self, group: dict, state: dict, like: torch.Tensor) -> None:
        if "step" not in state:
            device = like.device if group["fused"] else None
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype(group["fused"]), device=device)
        keys = self.per_weight if group["amsgrad"] else self.per_weight[:2]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def update(self, group: dict, views: list) -> None:
        states = [v.state for v in views]
        weights = [v.weights for v in views]
        function = adamw if group["decoupled_weight_decay"] else adam
        beta1, beta2 = group["betas"]
        function(weights, [v.grad for v in views], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                 [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], [s["step"] for s in states],
                 foreach=group["foreach"], capturable=False, differentiable=False, fused=group["fused"],
                 grad_scale=None, found_inf=None, has_complex=any(torch.is_complex(w) for w in weights),
                 amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
