"""Sparse parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): masks sharded like their weights.

Design (masking rule 10 of docs/design.md; docs/fsdp.md):

- **At rest, every rank keeps only its shard.** `fully_shard` turns `weight_orig` into a DTensor sharded
  over the mesh; the first time the controller sees that (`ShardedTarget.shard`, when the optimizer is
  handed over, at `step()` and before any update), it replaces the full bool `weight_mask` buffer, once,
  by the rank's own piece of it (a plain bool tensor of the local shard's shape, e.g. rows
  `[r * ceil(n / w), ...)` for `Shard(0)`), and from then on writes it in place only. Per-rank memory for
  masks is `1 / world` of the full masks, like the weights, gradients and optimizer state they go with.
- **Forward and backward need no mask.** A shard is zero outside its mask (pruned and regrown weights are
  zeroed, their optimizer state too), so the weight FSDP all-gathers is already the masked one: the forward
  pre-hook passes it through. The gradient is masked on the shard, after FSDP's reduce-scatter, by a
  post-accumulate-grad hook on the sharded parameter (FSDP2 calls those hooks), so `clip_grad_norm_` and
  the optimizer see exactly the gradient a DDP run sees.
- **At an update, every rank runs the same decision on full layers.** While an update runs
  (`GatherScope`), a target's `orig` and `mask` are the full tensors, all-gathered on first use; the full
  weight is gathered one layer at a time (asking for another layer's frees the previous one), the full
  masks are kept for the update (1 byte per weight). Every rank executes the unchanged, deterministic
  algorithm on identical full tensors (weights are all-gathered, dense gradients all-reduced, random
  draws seeded from `(seed, update, layer)`), so the collectives happen in the same order everywhere and
  every rank reaches the same masks; each rank then writes only its shard of every changed tensor
  (weights, gradients, optimizer state, mask), by index, in place. Per-rank peak during an update: the
  shards, the full masks, one full layer of weights and the scores the algorithm ranks by (RigL's dense
  gradients, SNFS's momentum: full tensors, as under DDP).
- **Counts never need a collective at rest**: each target caches its active count (identical on every
  rank) when its mask changes, so `dst.sparsity` or a table printed by rank 0 alone cannot hang.

The pieces: `ShardLayout` and `GatherScope` here; `ShardedTarget` (a `SparseTarget` whose writes reach each
rank's shard) and `Sharding` (the controller's FSDP2 side) in `dst_prune.distributed.sharded`.

Why not a DTensor mask buffer: FSDP2 does not shard buffers, and a DTensor buffer would be all-gathered by
nothing; the forward does not need it. Why not a replicated full mask: at 8 ranks a bool per weight is
more memory than the fp32 weight shard itself.
"""

from __future__ import annotations

import math

import torch

from .._torch import is_flat_param_view, local_shape_and_offset
from ..errors import DSTError

__all__ = ["GatherScope", "ShardLayout", "is_dtensor", "local_tensor", "refuse_fsdp1", "refuse_sharded"]


_DTENSOR: list = []  # the DTensor class, imported on first use (None where torch has no distributed)


def is_dtensor(tensor: object) -> bool:
    """Whether `tensor` is a `torch.distributed.tensor.DTensor` (without importing it where it is unavailable)."""
    if not _DTENSOR:
        try:
            import torch.distributed.tensor as dtensor
        except ImportError:  # pragma: no cover - builds without distributed
            dtensor = None
        _DTENSOR.append(getattr(dtensor, "DTensor", None))
    return _DTENSOR[0] is not None and isinstance(tensor, _DTENSOR[0])


def local_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The rank's own shard of a DTensor (a view: writes reach the DTensor), or `tensor` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class ShardLayout:
    """Where a rank's shard of a sharded parameter lies in the full tensor (any `Shard(d)` placements).

    Attributes:
        shape: the full (global) shape.
        local_shape: the shape of this rank's shard.
        offset: the global index of the shard's first element, per dimension.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], offset: tuple[int, ...],
                 local_shape: torch.Size | tuple[int, ...], *, mesh: object = None, placements: tuple = (),
                 stride: tuple[int, ...] | None = None) -> None:
        self.shape, self.local_shape, self.offset = torch.Size(shape), torch.Size(local_shape), tuple(offset)
        self.mesh, self.placements = mesh, tuple(placements)
        self.stride = stride if stride is not None else _contiguous_strides(self.shape)
        self.slices = tuple(slice(o, o + s) for o, s in zip(self.offset, self.local_shape))

    @classmethod
    def of(cls, param: torch.Tensor) -> ShardLayout:
        """The layout of a sharded parameter (a DTensor): its mesh, placements and this rank's piece."""
        shape, placements = torch.Size(param.shape), tuple(param.placements)
        local_shape, offset = local_shape_and_offset(shape, param.device_mesh, placements)
        return cls(shape, offset, local_shape, mesh=param.device_mesh, placements=placements,
                   stride=tuple(param.stride()))

    def local_part(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a full tensor of `shape` (a view)."""
        return full[self.slices]

    def local_indices(self, indices: torch.Tensor, positions: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flat row-major indices of the full tensor -> those that fall in this shard, as the shard's flat indices.

        `positions` (the same positions as a full bool tensor, or None) becomes the shard's piece of it.
        """
        if not indices.numel() or not math.prod(self.local_shape):
            empty = indices[:0]
            return empty, None if positions is None else self.local_part(positions)
        coordinates, rest = [], indices
        for size in reversed(self.shape):
            coordinates.append(rest % size)
            rest = rest // size
        coordinates.reverse()
        inside = torch.ones_like(indices, dtype=torch.bool)
        local = torch.zeros_like(indices)
        for coordinate, offset, size in zip(coordinates, self.offset, self.local_shape):
            shifted = coordinate - offset
            inside &= (shifted >= 0) & (shifted < size)
            local = local * size + shifted
        return local[inside], None if positions is None else self.local_part(positions)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's shard (a collective: every rank must call it, in the same order)."""
        from torch.distributed.tensor import DTensor

        dtype = local.dtype
        values = local.to(torch.uint8) if dtype == torch.bool else local  # gloo has no bool collectives
        full = DTensor.from_local(values.contiguous(), self.mesh, self.placements, run_check=False,
                                  shape=self.shape, stride=self.stride).full_tensor()
        return full.to(dtype) if dtype == torch.bool else full


class GatherScope:
    """The full tensors of sharded targets while an update (or a check) runs; see the module docstring.

    Holds each target's full mask (gathered on first use, written by the update, dropped at the end) and
    the full weight of one target at a time.
    """

    def __init__(self) -> None:
        self.masks: dict[int, torch.Tensor] = {}
        self.weight: tuple[int, torch.Tensor] | None = None
        self.peak_bytes = 0  # the most bytes of gathered tensors held at once (a diagnostic)

    def _held(self) -> None:
        held = sum(m.numel() * m.element_size() for m in self.masks.values())
        if self.weight is not None:
            held += self.weight[1].numel() * self.weight[1].element_size()
        self.peak_bytes = max(self.peak_bytes, held)

    def full_mask(self, target: object) -> torch.Tensor:
        key = id(target)
        if key not in self.masks:
            self.masks[key] = target.layout.gather(target.buffer_mask)
            self._held()
        return self.masks[key]

    def full_weight(self, target: object) -> torch.Tensor:
        key = id(target)
        if self.weight is None or self.weight[0] != key:
            self.weight = None  # free the previous layer before gathering the next
            self.weight = (key, target.param.detach().full_tensor())
            self._held()
        return self.weight[1]

    def forget_weight(self, target: object) -> None:
        """Drop the cached full weight of `target` (its shard was just written)."""
        if self.weight is not None and self.weight[0] == id(target):
            self.weight = None


def _is_fsdp1(module: object) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FullyShardedDataParallel)


FSDP1_FIX = ("dst_prune supports FSDP2 only: call dst_prune.apply(model, ...) on the unwrapped model, then "
             "torch.distributed.fsdp.fully_shard(block) for each block and fully_shard(model) (accelerate: "
             "fsdp_version=2), build the optimizer and hand it over with dst.optimizer = optimizer.")


def refuse_sharded(model: object, names: list[str], params: list[torch.Tensor]) -> None:
    """`apply` on a model already sharded (FSDP2 DTensors, or wrapped by FSDP1): a `DSTError` that says what to do."""

    if any(_is_fsdp1(m) for m in model.modules()):
        raise DSTError(f"model is wrapped by FullyShardedDataParallel (FSDP1), whose flat parameters cannot be "
                       f"masked in place. {FSDP1_FIX}")
    sharded = [n for n, p in zip(names, params) if is_dtensor(p)]
    if sharded:
        raise DSTError(f"{sharded[0]} (and {len(sharded) - 1} more) is already sharded (a DTensor, e.g. by "
                       f"fully_shard): dst_prune.apply must come first. Call dst_prune.apply(model, ...) on the "
                       f"unsharded model, then fully_shard(block) for each block and fully_shard(model).")


def refuse_fsdp1(module: object, tensor_name: str, name: str) -> None:
    """A `DSTError` if FSDP1 (`FullyShardedDataParallel`) replaced `module.<tensor_name>_orig` by a flat-parameter view.

    FSDP1 keeps a layer's weights as views of one flat parameter (`use_orig_params=True`) or as plain
    tensors outside `_parameters` (`use_orig_params=False`); neither can be masked in place.
    """
    key = tensor_name + "_orig"
    tensor = module._parameters.get(key)
    if tensor is None:
        tensor = module.__dict__.get(key)
    if is_flat_param_view(tensor):
        raise DSTError(f"{name} is managed by FullyShardedDataParallel (FSDP1) as a view of a flat parameter, "
                       f"which cannot be masked in place. {FSDP1_FIX}")

