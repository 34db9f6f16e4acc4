"""The hot path: `weight = weight_orig * weight_mask`, recomputed before every forward.

`weight_orig` is zero wherever the mask is (masking rule 3 (docs/design.md): pruned weights are zeroed, regrown ones
start at zero, and the masked gradient keeps them there under any optimizer that maps a zero gradient
and zero state to no change). So the product equals `weight_orig` itself, and `masked_weight` makes
that true by construction rather than by trust: it masks `weight_orig` in place (`zero_outside`)
whenever `weight_orig` or the mask changed since it last did (after every optimizer step; not on a
second forward of a gradient-accumulation step), and returns `weight_orig` as the effective weight
through `MaskedWeight`, whose backward masks the gradient in place the same way. Compared with writing the
product into a tensor of its own (as `torch.nn.utils.prune` does), this is one elementwise pass over the
weights and no weight-sized tensor at all: 4 bytes per sparse weight less memory.

`zero_outside` multiplies the bits: the float tensor is read as integers of its width (`float32` as `int32`) and
multiplied in place by the mask converted to 0/1 integers, a chunk at a time into a small reusable buffer. An
integer product by 1 keeps every bit and by 0 clears them all, so the result is bit for bit that of
`torch.where(mask, tensor, 0)`: a NaN or infinite weight or gradient at a masked position becomes 0 (a float
multiply would leave `nan * 0 = NaN`), and no weight-sized float mask is kept (a cached float mask would cost
4 bytes per weight, which is what puts `torch.nn.utils.prune` at 1.11x dense memory). Measured on CPU (torch
2.14, one thread, a 4096 x 4096 float32 weight at 90% sparsity, medians of 11 interleaved runs on a loaded
2-core machine): `torch.where(mask, w, 0, out=w)` 26-29 ms; `masked_fill_` with a cached inverted mask about the
same; `w.mul_(mask.view(torch.uint8))` 59 ms (a mixed-dtype multiply is not vectorized); `w.mul_(float_mask)`
10-14 ms (with a weight-sized float mask, and not exact for NaN); the bit product 8.4 ms, 3x `where` (5x on
LeNet-300-100's 784 x 300 weight, where the per-step cost of `where` made the masked step 1.6x dense). Its two
operations per chunk would each end in a thread barrier, which collapses on shared cores, so it runs with
at most one thread per `MASK_GRAIN` weights (one for ordinary layers; `dst_prune._threads`).

Anything a pruned position of `weight_orig` held is discarded at the next forward, which is what a
mask means; the tests check that outputs equal those of a `remove()`d copy. Writing into `weight`
between forwards writes into `weight_orig` (they share memory), and the next eager forward re-masks it.
Under `torch.compile` the graph reads `weight_orig` itself and masks only the gradient (`CompiledMaskedWeight`);
`weight_orig` is masked in place outside the graph, eagerly, by `DynamicSparsity.step()` (`mask_in_place`, never
traced), by loads (torch prune's form is masked as it loads) and by every update (no in-place write
inside the graph).
Under FSDP2 the mask is a shard and the all-gathered weight passes through (`dst_prune.distributed.fsdp`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .._scratch import CHUNK, scratch
from .._torch import is_view

__all__ = ["MASK_GRAIN", "CompiledMaskedWeight", "MaskedWeight", "mask_in_place", "masked_copy", "masked_weight",
           "zero_outside"]

#: the integer type of each float type's width (`zero_outside` multiplies the bits)
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64}
#: below this many elements `where` is as fast (one operation instead of two)
_SMALL = 1 << 13
#: weights per thread of `zero_outside`
MASK_GRAIN = 1 << 24


def _flat(tensor: torch.Tensor) -> torch.Tensor | None:
    """`tensor`'s elements as a 1-D view in memory order, if it is dense (contiguous or channels_last)."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if tensor.ndim == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).reshape(-1)  # (a view: this order is contiguous)
    return None


def _bit_product(tensor: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> bool:
    """Write `tensor` with zeros where `mask` is False into `out` (`tensor` itself, or a tensor of its layout) by
    the bit product; False (nothing written) where it does not apply: then `torch.where` does it."""
    bits = _BITS.get(tensor.dtype)
    n = tensor.numel()
    if (bits is None or n < _SMALL or tensor.device.type != "cpu" or mask.shape != tensor.shape
            or mask.stride() != tensor.stride() or (tensor.requires_grad and torch.is_grad_enabled())):
        return False
    values, keep, target = _flat(tensor), _flat(mask), _flat(out)
    if values is None or keep is None or target is None or mask.device != tensor.device:
        return False
    values, target = values.view(bits), target.view(bits)
    threads = torch.get_num_threads()
    wanted = max(1, n // MASK_GRAIN)
    if wanted < threads:  # (as `dst_prune._threads.threads_for`, inline: this runs twice per layer and step)
        torch.set_num_threads(wanted)
    try:
        chunk = CHUNK * min(wanted, threads)
        factors = scratch(bits, tensor.device, min(n, chunk))
        if n <= chunk:
            factors.copy_(keep)
            torch.mul(values, factors, out=target)
            return True
        for start in range(0, n, chunk):
            part = values[start:start + chunk]
            factor = factors[:part.numel()]
            factor.copy_(keep[start:start + chunk])
            torch.mul(part, factor, out=target[start:start + chunk])
    finally:
        if wanted < threads:
            torch.set_num_threads(threads)
    return True


def zero_outside(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`tensor` with zeros where `mask` is False, in place, bit for bit `torch.where(mask, tensor, 0)` (NaN and
    inf at masked positions become 0)."""
    if _bit_product(tensor, mask, tensor):
        return tensor
    return torch.where(mask, tensor, tensor.new_zeros(()), out=tensor)


def masked_copy(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`torch.where(mask, tensor, 0)`, a new tensor (of `tensor`'s layout), by the bit product where it applies."""
    out = torch.empty_like(tensor)
    if not _bit_product(tensor, mask, out):
        torch.where(mask, tensor, tensor.new_zeros(()), out=out)
    return out


def _writable(grad: torch.Tensor) -> bool:
    """Whether `grad` owns dense, non-overlapping memory that can be masked in place."""
    if is_view(grad):
        return False
    if grad.is_contiguous():
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(grad.ndim)
    return layout is not None and grad.is_contiguous(memory_format=layout)


class MaskedWeight(torch.autograd.Function):
    """The already masked `orig` as a differentiable weight, with the gradient `grad * mask` for `orig`."""

    @staticmethod
    def forward(ctx, orig: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return orig.view_as(orig)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        if torch.is_grad_enabled() and grad.requires_grad:  # (`create_graph=True`: a differentiable mask)
            return torch.where(mask, grad, grad.new_zeros(())), None
        return (zero_outside(grad, mask) if _writable(grad) else masked_copy(grad, mask)), None


class CompiledMaskedWeight(MaskedWeight):
    """Under `torch.compile`: `orig` itself as the weight, with the gradient `where(mask, grad, 0)` for `orig`.

    `orig` is zero outside the mask there too: `apply` zeroes it, every update writes zeros where it prunes and
    grows, and `DynamicSparsity.step()` masks it in place after every optimizer step (an eager pass; in eager
    training the same pass the forward would make). Masking inside the graph instead (`torch.where(mask, orig,
    0)`) made inductor write every masked weight in two layouts and transpose its mask at every step (a compiled
    masked resnet18 step: 1.16-1.30x compiled dense on 2 CPU threads, against 1.03x this way). The forward is
    `MaskedWeight`'s; the backward a plain `where` that the graph can hold (no in-place write, no thread setting).
    """

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0), None


def _sources(orig: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return [orig._version, orig.data_ptr(), mask._version, mask.data_ptr()]


def masked_weight(module: nn.Module, name: str, last: list) -> torch.Tensor:
    """The effective weight of `module.<name>`; `last` (owned by the caller) remembers what was masked.

    `weight_orig` is masked in place unless neither it nor the mask changed (same storage, same
    version) since this function last masked it.
    """
    orig, mask = module._parameters[name + "_orig"], module._buffers[name + "_mask"]
    if mask.shape != orig.shape:  # FSDP2: `orig` is the all-gathered weight, already masked; `mask` a shard
        return orig.view_as(orig) if torch.is_grad_enabled() and orig.requires_grad else orig.detach()
    if torch.compiler.is_compiling():  # (`orig` is kept masked outside the graph: see `CompiledMaskedWeight`)
        return CompiledMaskedWeight.apply(orig, mask) if torch.is_grad_enabled() and orig.requires_grad else \
            orig.detach()
    _mask_if_changed(orig, mask, last)
    if torch.is_grad_enabled() and orig.requires_grad:
        return MaskedWeight.apply(orig, mask)
    return orig.detach()


def _mask_if_changed(orig: torch.Tensor, mask: torch.Tensor, last: list) -> None:
    if _sources(orig, mask) != last:
        with torch.no_grad():
            zero_outside(orig, mask)
        last[:] = _sources(orig, mask)


def mask_in_place(module: nn.Module, name: str, last: list) -> None:
    """Zero `module.<name>_orig` outside its mask now, eagerly, unless nothing changed since `last`; also when the
    caller is being compiled (`dst.step()` inside a compiled training step), since the compiled forward reads
    `<name>_orig` as it is. Under FSDP2 the shards are masked by their own hooks.

    (Compiling needs `torch._dynamo`, so until it is imported the plain function runs; `torch.compiler.disable`
    itself imports it, which `import dst_prune` must not.)"""
    global _never_traced
    if "torch._dynamo" not in sys.modules:
        _mask_module(module, name, last)
        return
    if _never_traced is None:
        _never_traced = torch.compiler.disable(_mask_module)
    _never_traced(module, name, last)


_never_traced = None


def _mask_module(module: nn.Module, name: str, last: list) -> None:
    orig, mask = module._parameters[name + "_orig"], module._buffers[name + "_mask"]
    if mask.shape == orig.shape:
        _mask_if_changed(orig, mask, last)
