"""Argument checks of the compact optimizers: torch's rules, as `DSTError`s that name the argument."""

from __future__ import annotations

from .._validation import check_number
from ..errors import DSTError

__all__ = ["check_adam", "check_sgd"]


def _check_flags(optimizer: str, **flags: object) -> None:
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise DSTError(f"{optimizer}: {name} must be True, False or None; received {value!r}.")
    for name in ("capturable", "differentiable"):
        if flags.get(name):
            raise DSTError(f"{optimizer}({name}=True) is not supported: the active weights are gathered and "
                           f"scattered outside autograd and CUDA graphs. Use {name}=False.")
    if flags.get("fused") and flags.get("foreach"):
        raise DSTError(f"{optimizer}: fused=True and foreach=True cannot be combined; choose one.")


def check_adam(optimizer: str, *, lr: object, betas: object, eps: object, weight_decay: object,
               **flags: object) -> dict:
    """The defaults of an Adam-type optimizer, checked as `torch.optim.Adam` checks them."""
    check_number(lr, f"{optimizer}: lr", low=0.0)
    check_number(eps, f"{optimizer}: eps", low=0.0)
    check_number(weight_decay, f"{optimizer}: weight_decay", low=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise DSTError(f"{optimizer}: betas must be a pair (beta1, beta2) in [0, 1), e.g. (0.9, 0.999); "
                       f"received {betas!r}.")
    for i, beta in enumerate(betas):
        check_number(beta, f"{optimizer}: betas[{i}]", low=0.0, high=1.0)
    _check_flags(optimizer, **flags)
    return {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, **flags}


def check_sgd(optimizer: str, *, lr: object, momentum: object, dampening: object, weight_decay: object,
              nesterov: object, **flags: object) -> dict:
    """The defaults of SGD, checked as `torch.optim.SGD` checks them."""
    check_number(lr, f"{optimizer}: lr", low=0.0)
    check_number(momentum, f"{optimizer}: momentum", low=0.0)
    check_number(dampening, f"{optimizer}: dampening")
    check_number(weight_decay, f"{optimizer}: weight_decay", low=0.0)
    _check_flags(optimizer, nesterov=nesterov, **flags)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise DSTError(f"{optimizer}: nesterov=True needs momentum > 0 and dampening=0; received momentum="
                       f"{momentum!r}, dampening={dampening!r}.")
    return {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
            "nesterov": nesterov, **flags}
