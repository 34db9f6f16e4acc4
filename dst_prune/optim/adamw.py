"""`dst_prune.optim.AdamW`: Adam with decoupled weight decay (Loshchilov & Hutter, ICLR 2019, Algorithm 2)."""

from __future__ import annotations

from collections.abc import Iterable

from .adam import Adam

__all__ = ["AdamW"]


class AdamW(Adam):
    """`torch.optim.AdamW` with the moments of a sparse parameter kept over its active weights only.

    Same arguments, defaults (`weight_decay=0.01`) and results as `torch.optim.AdamW`; see `Adam`.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, free_gradients: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, free_gradients=free_gradients)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # as torch's AdamW: loaded groups always decay decoupled
            group["decoupled_weight_decay"] = True
