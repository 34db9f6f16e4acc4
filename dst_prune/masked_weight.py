"""The hot path: `weight = weight_orig * weight_mask`, recomputed before every forward.

A plain `orig * mask` pays twice on a bool mask: the bool-to-float multiply is not vectorized (about 5x
slower than a float multiply on CPU), and fresh weight-sized tensors are allocated at every step (page
faults on CPU: most of the cost, measured). `MaskedWeight` multiplies by the mask reinterpreted as
uint8 (vectorized), writes into the tensor that held the previous forward's weight, and writes nothing
when neither `weight_orig` nor the mask changed since (gradient accumulation, an evaluation forward
between a forward and its backward). Its backward masks the incoming gradient in place when that is
safe (a dense, non-view gradient, which a conv's or a linear's is), so `weight_orig.grad` is zero at
masked positions. Under `torch.compile` the plain product is traced.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MaskedWeight", "masked_weight", "reusable"]


def _factor(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8)


def _writable(grad: torch.Tensor) -> bool:
    """Whether `grad` owns dense, non-overlapping memory that can be masked in place."""
    if grad._is_view():
        return False
    if grad.is_contiguous():
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(grad.ndim)
    return layout is not None and grad.is_contiguous(memory_format=layout)


class MaskedWeight(torch.autograd.Function):
    """`orig * mask` written into `out` (when `write`), with the gradient `grad * mask` for `orig`."""

    @staticmethod
    def forward(ctx, orig: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, write: bool) -> torch.Tensor:
        if write:
            torch.mul(orig, _factor(mask), out=out)
            ctx.mark_dirty(out)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (mask,) = ctx.saved_tensors
        return (grad.mul_(_factor(mask)) if _writable(grad) else grad * _factor(mask)), None, None, None


def reusable(out: object, orig: torch.Tensor) -> bool:
    """Whether `out` can receive `orig`'s masked values in place (a detached tensor of the same layout)."""
    return (isinstance(out, torch.Tensor) and not isinstance(out, nn.Parameter) and not out.requires_grad
            and out.shape == orig.shape and out.dtype == orig.dtype and out.device == orig.device
            and out.stride() == orig.stride())


def masked_weight(module: nn.Module, name: str, last: list) -> torch.Tensor:
    """The effective weight of `module.<name>`; `last` (owned by the caller) remembers what was written.

    The buffer is reused only if it is the one this function wrote last (same storage, same version):
    a tensor anyone else put there (a compiled graph's output, say) is never written into.
    """
    orig, mask = module._parameters[name + "_orig"], module._buffers[name + "_mask"]
    if torch.compiler.is_compiling():
        return orig * mask
    out = module.__dict__.get(name)
    sources = [orig._version, orig.data_ptr(), mask._version, mask.data_ptr()]
    if reusable(out, orig) and len(last) == 6 and [out.data_ptr(), out._version] == last[4:]:
        write = sources != last[:4]
    else:
        out, write = torch.empty_like(orig), True
    if torch.is_grad_enabled() and orig.requires_grad:
        weight = MaskedWeight.apply(orig, mask, out, write)
    else:
        if write:
            torch.mul(orig.detach(), _factor(mask), out=out)
        weight = out
    last[:] = [*sources, out.data_ptr(), out._version]
    return weight
