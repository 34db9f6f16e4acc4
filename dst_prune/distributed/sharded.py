"""`ShardedTarget` and `Sharding`: a sparse parameter that FSDP2 sharded, and the controller's FSDP2 side.

The design is in `dst_prune.distributed.fsdp` (and docs/fsdp.md): masks sharded like their weights, updates
decided by every rank on full layers gathered one at a time, each rank writing its own shards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .._masking.masked_weight import zero_outside
from .._masking.target import SparseTarget
from .._masking.transaction import Transaction, fill
from .._selection import index_mask
from ..errors import DSTError
from .ddp import check_sync, mask_digest
from .fsdp import GatherScope, ShardLayout, is_dtensor, local_tensor, refuse_fsdp1

__all__ = ["MaskShardGradient", "ShardedTarget", "Sharding"]

logger = logging.getLogger(__name__)


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
        sharded = cls(target, ShardLayout.of(param))
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
