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

Why not a DTensor mask buffer: FSDP2 does not shard buffers, and a DTensor buffer would be all-gathered by
nothing; the forward does not need it. Why not a replicated full mask: at 8 ranks a bool per weight is
more memory than the fp32 weight shard itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .._masking.masked_weight import zero_outside
from .._masking.target import SparseTarget
from .._masking.transaction import Transaction, fill
from .._selection import index_mask
from .._torch import local_shape_and_offset
from ..errors import DSTError
from .ddp import check_sync, mask_digest

__all__ = ["GatherScope", "ShardLayout", "ShardedTarget", "Sharding", "is_dtensor", "local_tensor",
           "refuse_fsdp1", "refuse_sharded"]

logger = logging.getLogger(__name__)


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


class ShardLayout:
    """Where a rank's shard of a sharded parameter lies in the full tensor (any `Shard(d)` placements).

    Attributes:
        shape: the full (global) shape.
        local_shape: the shape of this rank's shard.
        offset: the global index of the shard's first element, per dimension.
    """

    def __init__(self, param: torch.Tensor) -> None:
        self.mesh, self.placements = param.device_mesh, tuple(param.placements)
        self.shape = torch.Size(param.shape)
        self.stride = tuple(param.stride())
        local_shape, offset = local_shape_and_offset(self.shape, self.mesh, self.placements)
        self.local_shape, self.offset = torch.Size(local_shape), tuple(offset)
        self.slices = tuple(slice(o, o + s) for o, s in zip(self.offset, self.local_shape))

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
    from ..errors import DSTError

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
    from ..errors import DSTError

    key = tensor_name + "_orig"
    tensor = module._parameters.get(key)
    if tensor is None:
        tensor = module.__dict__.get(key)
    base = getattr(tensor, "_base", None)
    if getattr(base, "_is_flat_param", False) or getattr(tensor, "_is_flat_param", False):
        raise DSTError(f"{name} is managed by FullyShardedDataParallel (FSDP1) as a view of a flat parameter, "
                       f"which cannot be masked in place. {FSDP1_FIX}")


class MaskShardGradient:
    """Post-accumulate-grad hook of a sharded parameter: zero its gradient shard outside the mask shard.

    FSDP2 calls it after the reduce-scatter, so gradient clipping and the optimizer see the masked
    gradient (masking rule 7, docs/design.md), as under DDP. A callable object that finds the mask on its module.
    """

    def __init__(self, module: nn.Module, tensor_name: str) -> None:
        self.module, self.tensor_name = module, tensor_name

    def __call__(self, param: torch.Tensor) -> None:
        grad = local_tensor(param.grad)
        mask = self.module._buffers.get(self.tensor_name + "_mask")
        if grad is not None and mask is not None and grad.shape == mask.shape:
            with torch.no_grad():
                zero_outside(grad, mask)


class ShardedTarget(SparseTarget):
    """A sparse parameter that FSDP2 sharded: its mask buffer holds this rank's shard only.

    While an update runs (`scope` set), `orig` and `mask` are the full tensors (gathered on first use), so an
    algorithm sees the same tensors as without sharding; writes reach each rank's shards by index. At rest,
    the counts come from a cache (the same on every rank), so reading them needs no collective.
    """

    sharded = True

    def __init__(self, target: SparseTarget, layout: ShardLayout) -> None:
        vars(self).update(vars(target))
        self.layout = layout
        self.scope: GatherScope | None = None  # set while an update gathers full tensors
        self._counts = (0, 0)  # (active weights, active groups) of the full mask

    @classmethod
    def shard(cls, target: SparseTarget) -> ShardedTarget | None:
        """If FSDP2 sharded `target`'s parameter since, the sharded view of it (its mask buffer replaced, this once,
        by this rank's piece); else None. The shard's gradient is then masked after FSDP's reduce-scatter."""
        param = target.param
        if target.sharded or not is_dtensor(param):
            return None
        sharded = cls(target, ShardLayout(param))
        full = target.buffer_mask
        sharded.cache_counts(full)
        target.module._buffers[target.tensor_name + "_mask"] = sharded.layout.local_part(full).contiguous().clone()
        param.register_post_accumulate_grad_hook(MaskShardGradient(target.module, target.tensor_name))
        with torch.no_grad():
            zero_outside(local_tensor(param), sharded.buffer_mask)
        return sharded

    @property
    def orig(self) -> torch.Tensor:
        """The parameter, or while an update runs, its full tensor (read only)."""
        return self.param if self.scope is None else self.scope.full_weight(self)

    @property
    def mask(self) -> torch.Tensor:
        """The mask shard, or while an update runs, the full mask."""
        return self.buffer_mask if self.scope is None else self.scope.full_mask(self)

    def full_mask(self) -> torch.Tensor:
        return self.layout.gather(self.buffer_mask) if self.scope is None else self.mask

    def write_full_mask(self, full_mask: torch.Tensor) -> None:
        self.buffer_mask.copy_(self.layout.local_part(full_mask.to(self.buffer_mask.device)))
        self.cache_counts(full_mask)

    def cache_counts(self, full_mask: torch.Tensor) -> None:
        """Remember the active counts of the full mask (read at rest without a collective)."""
        self._counts = (int(torch.count_nonzero(full_mask)),
                        int(torch.count_nonzero(self.grouping.group_mask(full_mask))))

    def local(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return local_tensor(tensor)

    def active(self) -> int:
        return self._counts[0] if self.scope is None else super().active()

    def active_groups(self) -> int:
        return self._counts[1] if self.scope is None else super().active_groups()

    def write(self, indices: torch.Tensor, positions: torch.Tensor | None, active: bool,
              tensors: Sequence[torch.Tensor], transaction: Transaction | None) -> None:
        """Write the full mask of the update and each rank's shards of the mask and of `tensors`, by index."""
        if positions is None and not self.mask.is_contiguous():
            positions = index_mask(indices, self.shape, self.mask.device)
        tensors = [local_tensor(t) for t in tensors]
        if positions is None and not all(t.is_contiguous() for t in tensors):
            positions = index_mask(indices, self.shape, self.mask.device)
        at = self.layout.local_indices(indices, positions)
        self.scope.forget_weight(self)
        if transaction is not None:
            transaction.record(self, indices, positions, active, [*tensors, self.buffer_mask], at)
        with torch.no_grad():
            fill(self.mask, indices, positions, active)
            fill(self.buffer_mask, *at, active)
            for tensor in tensors:
                fill(tensor, *at, 0)

    def refresh(self) -> None:
        """Zero the shard outside its mask (the next forward all-gathers the masked weight)."""
        with torch.no_grad():
            zero_outside(local_tensor(self.param), self.buffer_mask)


class Sharding:
    """The controller's FSDP2 side: notices sharded parameters, gathers full tensors for an update, checks ranks.

    Attributes:
        decision: the digest of the full masks this rank decided at its last update (or load).
        last_gathered_bytes: the most bytes of gathered full tensors the last update held at once (a diagnostic).
    """

    def __init__(self) -> None:
        self.decision: int | None = None
        self.last_gathered_bytes = 0

    @staticmethod
    def active(targets: Sequence[SparseTarget]) -> bool:
        """Whether the targets are sharded (all are, or none)."""
        return bool(targets) and targets[0].sharded

    def sync(self, targets: list[SparseTarget], quick: bool = False) -> bool:
        """Replace the targets whose parameters FSDP2 sharded since by `ShardedTarget`s. Returns whether any.

        Refuses FSDP1. `quick` (every `step()`) looks at the first target only; every update and hand-over
        checks them all.
        """
        first = targets[0]
        if quick and (first.sharded or (first.attached and not is_dtensor(first.param)
                                        and isinstance(first.param, nn.Parameter))):
            return False
        for target in targets:
            refuse_fsdp1(target.module, target.tensor_name, target.name)
        if not any(t.attached and not t.sharded and is_dtensor(t.param) for t in targets):
            return False
        plain = [t.name for t in targets if not is_dtensor(t.param)]
        if plain:
            raise DSTError(f"{plain[0]} (and {len(plain) - 1} more sparse tensors) is not sharded while others are: "
                           f"apply fully_shard to every block that holds sparse weights and then to the root model "
                           f"(fully_shard(block) for each block, then fully_shard(model)) before training.")
        self.decision = mask_digest(targets)  # the full masks, still replicated: no collective
        for i, target in enumerate(targets):
            targets[i] = ShardedTarget.shard(target) or target  # (in place: the algorithm holds the same list)
        logger.info("dst_prune: %d sparse tensors are sharded (FSDP2); their masks now hold each rank's shard",
                    sum(t.sharded for t in targets))
        return True

    @contextlib.contextmanager
    def gathered(self, targets: Sequence[SparseTarget]) -> Iterator[None]:
        """While an update runs, sharded targets show their full tensors (`GatherScope`)."""
        if not self.active(targets):
            yield
            return
        scope = GatherScope()
        for target in targets:
            target.scope = scope
        try:
            yield
        finally:
            try:
                self.decision = mask_digest(targets)
                self.last_gathered_bytes = scope.peak_bytes
            finally:
                for target in targets:
                    if id(target) in scope.masks:
                        target.cache_counts(scope.masks[id(target)])
                    target.scope = None

    def loaded(self, targets: Sequence[SparseTarget], masks: Sequence[torch.Tensor]) -> None:
        """After full masks were loaded into sharded targets: remember them as this rank's decision."""
        if self.active(targets):
            self.decision = mask_digest(targets, masks)

    def check_sync(self, targets: Sequence[SparseTarget]) -> bool:
        """Whether every rank decided the same full masks and the shards make exactly those (a collective)."""
        return check_sync(targets, decision=self.decision)
