"""Export a sparse model for inference, where sparsity can actually save time.

- `dense`: a copy with the masks made permanent (`remove`): plain weights with zeros, loadable anywhere.
- `csr`: as `dense`, with each sparse `nn.Linear` replaced by a `CSRLinear` whose weight is a
  `torch.sparse_csr` tensor; on CPU the product skips the zeros (faster than dense at high sparsity).
- `semi_structured`: as `dense`, with each sparse `nn.Linear` weight converted by
  `torch.sparse.to_sparse_semi_structured` (2:4 masks, from `granularity="2:4"`), which NVIDIA GPUs of
  compute capability 8.0+ multiply with sparse tensor cores, in float16 or bfloat16.
- `condensed`: as `dense`, with each sparse `nn.Linear` and 1x1 `nn.Conv2d` of constant fan-in (every
  active row has the same number of active inputs: `method="srigl"`, `granularity="n:m"`) replaced by a
  `CondensedLinear` (`dst_prune.exporting.condensed`): the kept rows' input indices and weights as dense arrays;
  ablated rows (no active input) output their bias. Other layers stay dense (logged at INFO).
- `shrink`: as `dense`, physically smaller: output channels without an active weight (`granularity=
  "channel"`, ablated neurons) are removed with the inputs and BatchNorm channels that consume them, their
  constant output folded into the consumer (`dst_prune.exporting.shrink`). MLPs and plain CNNs; the head's outputs
  are kept; a layer whose channels reach a residual addition or anything else it cannot follow is refused.

The model given is left as it is (still sparse, still trainable); the export is a deep copy in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .._masking.hook import DSTMask, is_sparse, make_permanent
from .._masking.readers import direct_readers
from ..errors import DSTError
from ..targets import TargetSpec
from .condensed import CondensedLinear, condense, constant_fan_in, refuse_if_empty
from .shrink import shrink

__all__ = ["FORMATS", "CSRLinear", "CondensedLinear", "export"]

FORMATS = ("dense", "csr", "semi_structured", "condensed", "shrink")


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


def _pruned_channels(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{layer: bool [out]}`, True at the output channels without an active weight, for sparse Linear/Conv2d."""
    pruned = {}
    for name, module in model.named_modules():
        hooks = module._forward_pre_hooks.values()
        if type(module) in (nn.Linear, nn.Conv2d) and any(isinstance(h, DSTMask) and h._tensor_name == "weight"
                                                          for h in hooks):
            rows = ~module.weight_mask.reshape(module.weight_mask.shape[0], -1).any(1)
            if bool(rows.any()):
                pruned[name] = rows.clone()
    return pruned


def export(model: nn.Module, format: str = "dense") -> nn.Module:
    """A copy of the sparse `model` for inference in `format`.

    The copy is in eval mode with `requires_grad=False`; `model` itself stays sparse and trainable.

    Args:
        model: a model made sparse by `dst_prune.apply`.
        format: one of `FORMATS`:
            `dense`: the masks made permanent (plain weights with zeros);
            `csr`: sparse `nn.Linear` layers as `torch.sparse_csr` (`CSRLinear`), for CPU;
            `semi_structured`: 2:4 sparse `nn.Linear` weights for NVIDIA sparse tensor cores (fp16/bf16, CUDA);
            `condensed`: constant fan-in `nn.Linear` / 1x1 `nn.Conv2d` layers as `CondensedLinear`, the
            representation of SRigL (Lasby et al., ICLR 2024, "Dynamic Sparse Training with Structured
            Sparsity"); other layers stay dense;
            `shrink`: pruned output channels removed, with the inputs that consume them: a smaller dense
            model, as channel-level DST makes possible (Yin et al. 2023, "Chase").

    Returns:
        The exported copy.

    Raises:
        DSTError: an unknown format; a model without dst_prune masks; (semi_structured) weights that are not
            float16/bfloat16 on CUDA or not 2:4; (condensed) no constant fan-in layer; (shrink) no pruned
            channel to remove, a model torch.fx cannot trace, or a layer whose pruned channels feed a
            residual addition or another operation shrink cannot follow (named in the message).
    """
    if format not in FORMATS:
        raise DSTError(f"format={format!r} is unknown; valid choices: {', '.join(FORMATS)}.")
    if not is_sparse(model):
        raise DSTError("model has no dst_prune masks: nothing to export (apply dst_prune first, or use the model "
                       "as it is).")
    linears = _sparse_linears(model) if format in ("csr", "semi_structured") else []
    if format == "condensed":
        masks, dense = constant_fan_in(model)
        refuse_if_empty(masks, dense)
    if format == "shrink":
        pruned = _pruned_channels(model)
        if not pruned:
            raise DSTError("format='shrink' found no pruned output channel (a Linear row or conv filter without "
                           "active weights) in a sparse nn.Linear or nn.Conv2d: nothing to remove. Train with "
                           "granularity='channel', or use format='dense', 'csr' or 'condensed'.")
    exported = copy.deepcopy(model)
    make_permanent(exported)
    exported.eval().requires_grad_(False)
    if format == "condensed":
        return condense(exported, masks)
    if format == "shrink":
        return shrink(exported, pruned)
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
