"""The condensed representation of constant fan-in sparse layers (`dst_prune.export(format="condensed")`).

A sparse layer whose active rows all have the same number `k` of active inputs (constant fan-in, the
structure SRigL trains: Lasby et al., ICLR 2024, "Dynamic Sparse Training with Structured Sparsity",
Section 3) is stored as two dense `[out_active, k]` arrays: the active input positions of every kept
row and their weights. Rows without active inputs are ablated neurons: they output their bias (or 0) and
cost nothing. The product is `y[:, r] = sum_j W[r, j] * x[:, idx[r, j]] + b[r]`.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .._masking.hook import DSTMask
from .._masking.readers import direct_readers
from .._threads import threads_for
from ..errors import DSTError
from ..targets import TargetSpec

__all__ = ["BLOCK_ELEMENTS", "CSR_BELOW_ROWS", "CondensedLinear", "condense", "constant_fan_in", "refuse_if_empty"]

logger = logging.getLogger(__name__)

# Below this many input rows (batch x positions) the product runs as a CSR matrix-vector product, from
# this many on as an `embedding_bag`; where they cross on a 2-thread x86 CPU (4096 x 4096 at 90-99%).
CSR_BELOW_ROWS = 16
# `embedding_bag` runs over blocks of input rows whose table (`in_features x rows`) holds about this many elements.
BLOCK_ELEMENTS = 131072


class CondensedLinear(nn.Module):
    """A constant fan-in sparse `nn.Linear` (or 1x1 `nn.Conv2d`, groups 1) in condensed form.

    Buffers: `indices` `[out_active, fan_in]` (long, the active inputs of each kept row, ascending),
    `weight` `[out_active, fan_in]`, `bias` `[out_features]` or None, `rows` `[out_active]` (the output
    positions of the kept rows). The output has the dense layer's shape; ablated rows output the bias.

    What was measured (CPU, one 4096 x 4096 layer, 90-99% sparsity, float32, 1 and 2 threads): gathering
    `x[:, indices]` and then multiplying (`(x_g * W).sum(-1)`, `einsum`, `bmm`, `torch.gather` on an
    expanded `x`, `index_select` into a preallocated buffer) writes an `[rows, out_active, fan_in]`
    temporary, 1.0-2.8x dense at batch 1 and 3-10x slower than dense at batch 32. Two fused kernels win:
    a CSR product with int32 indices (MKL's sparse matrix-vector product; 2.2x dense at 90% for one row,
    where `torch.sparse_csr` with its default int64 indices gives 1.2x) and `embedding_bag` with
    `per_sample_weights`, where the bags are the rows and the table is `x^T` (6x dense at 90% for 32 rows,
    but 2-5x slower than CSR for one row). So the forward runs CSR below `CSR_BELOW_ROWS` input rows
    and `embedding_bag` from there on, for dtypes MKL does not take (bfloat16) and on other devices (not
    measured: no GPU was at hand). Both read the
    same int32 copy of `indices` (non-persistent, rebuilt on load) and `weight` itself, without copies.
    On CPU the product runs with at most one of torch's threads per `dst_prune._threads.GRAIN` multiply-adds
    (one thread at batch 1): a multi-threaded sparse product collapses on a machine whose cores are shared.
    """

    def __init__(self, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                 in_features: int, out_features: int, stride: int = 0) -> None:
        """Build from the condensed arrays.

        Args:
            indices: `[out_active, fan_in]` active input positions of each kept row.
            weight: `[out_active, fan_in]` their weights.
            bias: `[out_features]` or None.
            rows: `[out_active]` output positions of the kept rows.
            in_features: inputs of the dense layer.
            out_features: outputs of the dense layer.
            stride: for a 1x1 convolution, its stride; 0 for a Linear layer.
        """
        super().__init__()
        self.in_features, self.out_features, self.stride = in_features, out_features, stride
        self.register_buffer("indices", indices.detach().long().contiguous())
        self.register_buffer("weight", weight.detach().contiguous().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("rows", rows.detach().long().clone())
        self.register_buffer("_columns", self.indices.int(), persistent=False)
        crow = torch.arange(len(rows) + 1, dtype=torch.int32, device=indices.device) * self.indices.shape[1]
        self.register_buffer("_crow", crow, persistent=False)
        self._all_rows = len(rows) == out_features
        with warnings.catch_warnings():  # torch warns once that sparse CSR is in beta: here, not in a forward
            warnings.simplefilter("ignore", UserWarning)
            self._csr()

    @property
    def fan_in(self) -> int:
        return self.indices.shape[1]

    def extra_repr(self) -> str:
        kind = "linear" if not self.stride else f"conv1x1, stride={self.stride}"
        return (f"{kind}, in_features={self.in_features}, out_features={self.out_features}, "
                f"kept_rows={len(self.rows)}, fan_in={self.fan_in}, bias={self.bias is not None}")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._columns.copy_(self.indices)

    def _csr(self) -> torch.Tensor:
        """The kept rows as a CSR matrix with int32 indices, sharing `weight` and the int32 indices."""
        return torch.sparse_csr_tensor(self._crow, self._columns.view(-1), self.weight.view(-1),
                                       (len(self.rows), self.in_features), check_invariants=False)

    def _bags(self, xt: torch.Tensor) -> torch.Tensor:
        """`embedding_bag` over blocks of `BLOCK_ELEMENTS // in_features` (at least 32) input rows at a time, so
        that the table `x^T` of a block stays in cache while every bag reads its `fan_in` rows of it."""
        n, block = xt.shape[1], max(32, BLOCK_ELEMENTS // self.in_features)
        if n <= block:
            return nn.functional.embedding_bag(self._columns, xt.contiguous(), mode="sum",
                                               per_sample_weights=self.weight)
        out = xt.new_empty(len(self.rows), n)
        for start in range(0, n, block):
            out[:, start:start + block] = nn.functional.embedding_bag(
                self._columns, xt[:, start:start + block].contiguous(), mode="sum", per_sample_weights=self.weight)
        return out

    def transposed_product(self, xt: torch.Tensor) -> torch.Tensor:
        """`W_dense @ xt + b` for `xt` `[in_features, rows]`: `[out_features, rows]`."""
        n = xt.shape[1]
        bias = None
        if self.bias is not None:
            bias = self.bias if self._all_rows else self.bias[self.rows]
        use_csr = n < CSR_BELOW_ROWS and xt.device.type == "cpu" and xt.dtype in (torch.float32, torch.float64)
        with threads_for(n * self.weight.numel(), xt.device):
            if use_csr:
                matrix = self._csr()
                if n == 1:  # the matrix-vector kernel: about 1.7x faster than a one-column matrix product
                    vector = xt[:, 0]
                    product = (matrix @ vector if bias is None else torch.addmv(bias, matrix, vector)).unsqueeze(1)
                else:
                    product = matrix @ xt if bias is None else torch.addmm(bias.unsqueeze(1), matrix, xt)
            else:
                product = self._bags(xt)
                if bias is not None:
                    product = product.add_(bias.unsqueeze(1))
        if self._all_rows:
            return product
        if self.bias is None:
            full = product.new_zeros(self.out_features, n)
        else:
            full = self.bias.unsqueeze(1).repeat(1, n)  # a copy: index_copy_ must not write into the bias
        return full.index_copy_(0, self.rows, product)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.stride:  # Linear: features last
            out = self.transposed_product(x.reshape(-1, self.in_features).T).T
            return out.reshape(*x.shape[:-1], self.out_features)
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        batch, _, height, width = x.shape
        xt = x.reshape(self.in_features, -1) if batch == 1 else x.transpose(0, 1).reshape(self.in_features, -1)
        out = self.transposed_product(xt).reshape(self.out_features, batch, height, width)
        return out.transpose(0, 1)


def _fan_in_problem(module: nn.Module, mask: torch.Tensor) -> str | None:
    """Why `module` cannot be condensed, or None."""
    if type(module) is nn.Conv2d:
        if module.kernel_size != (1, 1) or module.groups != 1:
            return f"a {module.kernel_size[0]}x{module.kernel_size[1]} Conv2d with groups={module.groups} (only " \
                   f"nn.Linear and 1x1 Conv2d with groups=1 are condensed)"
        if module.padding not in ((0, 0), "valid") or module.stride[0] != module.stride[1]:
            return f"a 1x1 Conv2d with padding={module.padding}, stride={module.stride} (condensed takes padding 0 " \
                   f"and equal strides)"
    elif type(module) is not nn.Linear:
        return f"a {type(module).__name__} (only nn.Linear and 1x1 Conv2d with groups=1 are condensed)"
    counts = mask.reshape(mask.shape[0], -1).sum(1)
    active = counts[counts > 0]
    if active.numel() == 0:
        return "it has no active weight"
    if int(active.min()) != int(active.max()):
        return f"its fan-in is not constant: active rows have {int(active.min())} to {int(active.max())} active " \
               f"inputs (train with constant fan-in, e.g. granularity='n:m', or method='srigl')"
    return None


def constant_fan_in(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Find the sparse layers of `model` (dst_prune masks attached) that can be condensed.

    Returns:
        `({module name: its bool mask [out, in]}, {module name: why it stays dense})`. Layers whose weight
        a parent reads directly (`nn.MultiheadAttention.out_proj`) are among the second.
    """
    specs = [TargetSpec(f"{n}.weight" if n else "weight", n, "weight") for n, module in model.named_modules()
             if any(isinstance(h, DSTMask) and h._tensor_name == "weight" for h in module._forward_pre_hooks.values())]
    read = {f"{p}.{path}".strip("."): p for p, entries in direct_readers(model, specs).items() for path, _ in entries}
    eligible, dense = {}, {}
    for spec in specs:
        module = model.get_submodule(spec.module_name)
        if spec.module_name in read:
            dense[spec.module_name] = f"its parent {read[spec.module_name] or 'the model'} " \
                                      f"({type(model.get_submodule(read[spec.module_name])).__name__}) reads its weight"
            continue
        mask = module.weight_mask
        problem = _fan_in_problem(module, mask)
        if problem is None:
            eligible[spec.module_name] = mask.detach().reshape(mask.shape[0], -1).clone()
        else:
            dense[spec.module_name] = problem
    return eligible, dense


def condensed_from(module: nn.Module, mask: torch.Tensor) -> CondensedLinear:
    """The `CondensedLinear` of a plain (masks removed) Linear or 1x1 Conv2d with its constant fan-in `mask`."""
    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    counts = mask.sum(1)
    rows = torch.nonzero(counts, as_tuple=True)[0]
    fan_in = int(counts[rows[0]])
    # the active positions of each kept row, ascending: a stable sort of the mask puts the ones last
    order = torch.sort(mask[rows].to(torch.uint8), dim=1, stable=True).indices
    indices = order[:, mask.shape[1] - fan_in:]
    stride = 0 if isinstance(module, nn.Linear) else module.stride[0]
    return CondensedLinear(indices, weight[rows].gather(1, indices), module.bias, rows, mask.shape[1], mask.shape[0],
                           stride)


def refuse_if_empty(masks: dict[str, torch.Tensor], dense: dict[str, str]) -> None:
    """Log why each layer stays dense; raise `DSTError` when no layer can be condensed."""
    for name, why in dense.items():
        logger.info("condensed export: %s stays dense: %s", name, why)
    if not masks:
        listed = "; ".join(f"{n}: {w}" for n, w in list(dense.items())[:5]) or "no sparse layer"
        raise DSTError(f"format='condensed' found no layer to condense ({listed}). It needs sparse nn.Linear or 1x1 "
                       f"nn.Conv2d layers whose active rows all have the same number of active inputs; train with "
                       f"method='srigl' or granularity='n:m', or use format='csr'.")


def condense(exported: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Swap the layers named in `masks` (in the masks-removed copy `exported`) for `CondensedLinear`s."""
    for name, mask in masks.items():
        parent_name, _, child = name.rpartition(".")
        setattr(exported.get_submodule(parent_name), child, condensed_from(exported.get_submodule(name), mask))
    return exported
