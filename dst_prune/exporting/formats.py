"""Export a sparse model for inference, where sparsity can actually save time.

- `dense`: a copy with the masks made permanent (`remove`): plain weights with zeros, loadable anywhere.
- `csr`: as `dense`, with each sparse `nn.Linear` (and transformers' `Conv1D`, a Linear storing its weight
  as input x output: GPT-2's layers) replaced by a `CSRLinear` whose weight is a `torch.sparse_csr` tensor;
  on CPU the product skips the zeros (faster than dense at high sparsity).
- `semi_structured`: as `dense`, with each sparse `nn.Linear` weight converted by
  `torch.sparse.to_sparse_semi_structured` (2:4 masks, from `granularity="2:4"`), which NVIDIA GPUs of
  compute capability 8.0+ multiply with sparse tensor cores, in float16 or bfloat16; a sparse `Conv1D`
  becomes an `nn.Linear` with its transposed weight, converted the same way.
- `condensed`: as `dense`, with each sparse `nn.Linear` and 1x1 `nn.Conv2d` of constant fan-in (every
  active row has the same number of active inputs: `method="srigl"`, `granularity="n:m"`) replaced by a
  `CondensedLinear` (`dst_prune.condensed`): the kept rows' input indices and weights as dense arrays;
  ablated rows (no active input) output their bias. Other layers stay dense (logged at INFO).
- `shrink`: as `dense`, physically smaller: output channels without an active weight (`granularity=
  "channel"`, ablated neurons) are removed with the inputs and BatchNorm channels that consume them, their
  constant output folded into the consumer (`dst_prune.shrink`), wherever the channel analysis of the traced
  graph proves the result the same (`dst_prune.exporting._channel_flow`); channels tied to ones that stay are kept
  (logged), channels reaching an operation it cannot follow refuse the export by layer.

`csr` and `semi_structured` leave every other sparse tensor dense (a convolution, a weight a parent reads
directly) and log a warning that lists them; with nothing to convert they refuse.

The model given is left as it is (still sparse, still trainable); the export is a deep copy in eval mode.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .._masking.hook import DSTMask, is_sparse, make_permanent
from .._masking.readers import direct_readers
from .._threads import threads_for
from ..errors import DSTError
from ..targets import TargetSpec, is_transformers_conv1d, qualified
from .condensed import CondensedLinear, condense, constant_fan_in, refuse_if_empty
from .shrink import shrink

__all__ = ["FORMATS", "CSRLinear", "CondensedLinear", "export"]

logger = logging.getLogger(__name__)

FORMATS = ("dense", "csr", "semi_structured", "condensed", "shrink")


class CSRLinear(nn.Module):
    """`nn.Linear` with a `torch.sparse_csr` weight: `y = (W @ x^T)^T + b` skipping the zeros of `W`.

    The CSR indices are int32 where they fit (MKL's sparse kernels take them directly; with torch's default int64
    indices a product is converted first), and a single input row takes the matrix-vector kernel: measured on a
    4096 x 4096 layer at 90% sparsity, one thread, batch 1: 1.3 ms against 12.6 ms for an int64 matrix product
    and 12.4 ms for the dense layer. On CPU the product runs with at most one of torch's threads per
    `dst_prune._threads.GRAIN` multiply-adds (MKL's sparse kernels collapse on a machine whose cores are shared).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        csr = weight.detach().to_sparse_csr()
        if csr._nnz() < 2**31 - 1 and max(weight.shape) < 2**31 - 1:
            csr = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape,
                                          check_invariants=False)  # (indices from to_sparse_csr: valid)
        self.register_buffer("weight", csr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.weight._nnz()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        with threads_for(flat.shape[0] * self.weight._nnz(), flat.device):
            if flat.shape[0] == 1 and flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
                vector = flat[0]
                out = (self.weight @ vector if self.bias is None else torch.addmv(self.bias, self.weight, vector))
                return out.reshape(*x.shape[:-1], self.out_features)
            out = (self.weight @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _is_two_four(weight: torch.Tensor) -> bool:
    blocks = (weight != 0).reshape(weight.shape[0], -1, 4)
    return weight.shape[1] % 4 == 0 and bool((blocks.sum(-1) <= 2).all())


def _linear_layers(model: nn.Module) -> tuple[dict[str, bool], dict[str, str]]:
    """The sparse layers that `csr` and `semi_structured` convert, and the sparse tensors they leave dense.

    Returns:
        `({layer name: True for a transformers Conv1D (weight stored input x output)}, {tensor name: why it stays
        dense})`. A layer whose weight a parent reads directly (`nn.MultiheadAttention.out_proj`) stays dense.
    """
    masked = [TargetSpec(qualified(n, h._tensor_name), n, h._tensor_name) for n, module in model.named_modules()
              for h in module._forward_pre_hooks.values() if isinstance(h, DSTMask)]
    read = {f"{p}.{path}".strip("."): p for p, entries in direct_readers(model, masked).items() for path, _ in entries}
    modules = dict(model.named_modules())
    layers, dense = {}, {}
    for spec in masked:
        module = modules[spec.module_name]
        if spec.module_name in read:
            parent = read[spec.module_name]
            dense[spec.name] = f"its parent {parent or 'the model'} ({type(modules[parent]).__name__}) reads it " \
                               f"directly"
        elif spec.tensor_name == "weight" and (type(module) is nn.Linear or is_transformers_conv1d(module)):
            layers[spec.module_name] = is_transformers_conv1d(module)
        else:
            dense[spec.name] = f"a {type(module).__name__} tensor (only nn.Linear and transformers' Conv1D weights " \
                               f"are converted)"
    return layers, dense


def _report_dense(format: str, layers: dict[str, bool], dense: dict[str, str]) -> None:
    """Warn about the sparse tensors `format` leaves dense; refuse when it would convert nothing."""
    listed = "; ".join(f"{name}: {why}" for name, why in list(dense.items())[:6])
    more = f"; and {len(dense) - 6} more" if len(dense) > 6 else ""
    if not layers:
        raise DSTError(f"format={format!r} found no sparse layer to convert ({listed or 'no sparse tensor'}{more}): "
                       f"it converts sparse nn.Linear and transformers' Conv1D layers. Export with format='dense' "
                       f"(or 'shrink' for pruned channels of convolutions).")
    if dense:
        logger.warning("format=%r converts %d sparse layers and leaves %d sparse tensors dense: %s%s", format,
                       len(layers), len(dense), listed, more)


def _linear_weight(module: nn.Module, transposed: bool) -> torch.Tensor:
    """The `[out, in]` weight of a Linear, or of a transformers Conv1D (stored `[in, out]`)."""
    return module.weight.detach().t().contiguous() if transposed else module.weight.detach()


def _semi_structured(exported: nn.Module, layers: dict[str, bool]) -> None:
    """Convert the 2:4 weights of `layers` in place, after checking every one of them."""
    for name, transposed in layers.items():
        weight = _linear_weight(exported.get_submodule(name), transposed)
        if not _is_two_four(weight):
            raise DSTError(f"{name}.weight is not 2:4 sparse: train it with granularity='2:4' (sparsity=0.5).")
        if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
            raise DSTError(f"{name}.weight is {weight.dtype} on {weight.device}: format='semi_structured' needs "
                           f"float16 or bfloat16 weights on an NVIDIA GPU (compute capability 8.0+). Move and cast "
                           f"the model first (model.half().cuda()).")
    for name, transposed in layers.items():
        module = exported.get_submodule(name)
        weight = _linear_weight(module, transposed)
        try:
            sparse = torch.sparse.to_sparse_semi_structured(weight)
        except (RuntimeError, ValueError) as error:
            raise DSTError(f"{name}.weight ({tuple(weight.shape)}, {weight.dtype}) cannot be converted to 2:4 "
                           f"semi-structured form: {error}") from error
        if transposed:  # a Conv1D becomes the nn.Linear it computes
            bias = module.bias is not None
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device=weight.device, dtype=weight.dtype)
            if bias:
                module.bias = nn.Parameter(exported.get_submodule(name).bias.detach().clone(), requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(exported.get_submodule(parent_name), child, module.eval())
        module.weight = nn.Parameter(sparse, requires_grad=False)


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
            `csr`: sparse `nn.Linear` and transformers `Conv1D` layers as `torch.sparse_csr` (`CSRLinear`),
            for CPU;
            `semi_structured`: 2:4 sparse `nn.Linear` (and `Conv1D`, as the `nn.Linear` it computes) weights
            for NVIDIA sparse tensor cores (fp16/bf16, CUDA);
            `condensed`: constant fan-in `nn.Linear` / 1x1 `nn.Conv2d` layers as `CondensedLinear`, the
            representation of SRigL (Lasby et al., ICLR 2024, "Dynamic Sparse Training with Structured
            Sparsity"); other layers stay dense;
            `shrink`: pruned output channels removed, with the inputs that consume them: a smaller dense
            model, as channel-level DST makes possible (Yin et al. 2023, "Chase").

    Returns:
        The exported copy.

    Raises:
        DSTError: an unknown format; a model without dst_prune masks; (csr, semi_structured) no sparse
            Linear or Conv1D layer to convert (other sparse tensors stay dense, logged as a warning);
            (semi_structured) weights that are not float16/bfloat16 on CUDA or not 2:4; (condensed) no constant
            fan-in layer; (shrink) no pruned channel to remove, a model torch.fx cannot trace, or a layer whose
            removable pruned channels reach an operation shrink cannot prove keeps channels apart (named in the
            message).
    """
    if format not in FORMATS:
        raise DSTError(f"format={format!r} is unknown; valid choices: {', '.join(FORMATS)}.")
    if not is_sparse(model):
        raise DSTError("model has no dst_prune masks: nothing to export (apply dst_prune first, or use the model "
                       "as it is).")
    if format in ("csr", "semi_structured"):
        layers, dense = _linear_layers(model)
        _report_dense(format, layers, dense)
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
    if format == "semi_structured":
        _semi_structured(exported, layers)
    elif format == "csr":
        for name, transposed in layers.items():
            module = exported.get_submodule(name)
            parent_name, _, child = name.rpartition(".")
            setattr(exported.get_submodule(parent_name), child, CSRLinear(_linear_weight(module, transposed),
                                                                          module.bias))
    return exported
