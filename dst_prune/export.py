"""Export a sparse model for inference, where sparsity can actually save time.

- `dense`: a copy with the masks made permanent (`remove`): plain weights with zeros, loadable anywhere.
- `csr`: as `dense`, with each sparse `nn.Linear` replaced by a `CSRLinear` whose weight is a
  `torch.sparse_csr` tensor; on CPU the product skips the zeros (faster than dense at high sparsity).
- `semi_structured`: as `dense`, with each sparse `nn.Linear` weight converted by
  `torch.sparse.to_sparse_semi_structured` (2:4 masks, from `granularity="2:4"`), which NVIDIA GPUs of
  compute capability 8.0+ multiply with sparse tensor cores, in float16 or bfloat16.

The model given is left as it is (still sparse, still trainable); the export is a deep copy in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import DSTError
from .masking import DSTMask, is_sparse, make_permanent
from .readers import direct_readers
from .targets import TargetSpec

__all__ = ["FORMATS", "CSRLinear", "export"]

FORMATS = ("dense", "csr", "semi_structured")


class CSRLinear(nn.Module):
    """`nn.Linear` with a `torch.sparse_csr` weight: `y = (W @ x^T)^T + b` skipping the zeros of `W`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.weight._nnz()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = (self.weight @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _is_two_four(weight: torch.Tensor) -> bool:
    blocks = (weight != 0).reshape(weight.shape[0], -1, 4)
    return weight.shape[1] % 4 == 0 and bool((blocks.sum(-1) <= 2).all())


def _sparse_linears(model: nn.Module) -> list[str]:
    """The names of the sparse `nn.Linear` modules that can be swapped (no parent reads their weight)."""
    specs = [TargetSpec(f"{n}.weight" if n else "weight", n, "weight") for n, module in model.named_modules()
             if any(isinstance(h, DSTMask) and h._tensor_name == "weight" for h in module._forward_pre_hooks.values())]
    read = {f"{p}.{path}".strip(".") for p, entries in direct_readers(model, specs).items() for path, _ in entries}
    modules = dict(model.named_modules())
    return [s.module_name for s in specs if type(modules[s.module_name]) is nn.Linear and s.module_name not in read]


def export(model: nn.Module, format: str = "dense") -> nn.Module:
    """A copy of the sparse `model` for inference in `format` (`dense`, `csr` or `semi_structured`).

    Raises:
        DSTError: an unknown format, a model without dst_prune masks, or (semi_structured) weights that are
            not on a CUDA device, not float16/bfloat16, or not 2:4.
    """
    if format not in FORMATS:
        raise DSTError(f"format={format!r} is unknown; valid choices: {', '.join(FORMATS)}.")
    if not is_sparse(model):
        raise DSTError("model has no dst_prune masks: nothing to export (apply dst_prune first, or use the model "
                       "as it is).")
    linears = _sparse_linears(model) if format != "dense" else []
    exported = copy.deepcopy(model)
    make_permanent(exported)
    exported.eval().requires_grad_(False)
    for name in linears:
        linear = exported.get_submodule(name)
        if format == "csr":
            parent_name, _, child = name.rpartition(".")
            setattr(exported.get_submodule(parent_name), child, CSRLinear(linear.weight, linear.bias))
            continue
        weight = linear.weight
        if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
            raise DSTError(f"{name}.weight is {weight.dtype} on {weight.device}: format='semi_structured' needs "
                           f"float16 or bfloat16 weights on an NVIDIA GPU (compute capability 8.0+). Move and cast "
                           f"the model first (model.half().cuda()).")
        if not _is_two_four(weight):
            raise DSTError(f"{name}.weight is not 2:4 sparse: train it with granularity='2:4' (sparsity=0.5).")
        linear.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(weight), requires_grad=False)
    return exported
