"""Agreement of masks across the ranks of a distributed run.

Masks depend only on weights that DDP keeps identical, on all-reduced scores and on generators seeded
from `(seed, update index, layer)`, so every rank computes the same masks without broadcasting them.
`check_sync` verifies that cheaply: it all-reduces a digest of the masks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .._bits import pack_bits
from .._masking.masked_weight import zero_outside
from .._masking.target import SparseTarget
from .._torch import ddp_ignore

__all__ = ["all_reduce_mean", "broadcast_masks", "check_sync", "ignore_masks_in_ddp", "is_distributed", "mask_digest",
           "prepare_for_ddp"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average each tensor in place across ranks (scores that masks depend on; masking rule 8 (docs/design.md))."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(world)


def broadcast_masks(targets: Sequence[SparseTarget], src: int = 0) -> None:
    """Give every rank the masks of rank `src` (in place), e.g. once before training if ranks could differ."""
    if not is_distributed():
        return
    device = targets[0].mask.device if dist.get_backend() == "nccl" else torch.device("cpu")
    for t in targets:
        values = t.mask.to(device=device, dtype=torch.uint8)  # gloo has no bool collectives
        dist.broadcast(values, src)
        t.mask.copy_(values)


def ignore_masks_in_ddp(model: torch.nn.Module, targets: Sequence[SparseTarget]) -> None:
    """Tell `DistributedDataParallel` (built on `model` later) not to broadcast the masks at every forward.

    The masks agree across ranks by construction (rule 8), so re-broadcasting them every forward, as DDP
    does with buffers by default, would only cost bandwidth. Other buffers (BatchNorm statistics) are
    unaffected.
    """
    names = {f"{t.module_name}.{t.tensor_name}_mask" if t.module_name else f"{t.tensor_name}_mask" for t in targets}
    ddp_ignore(model, names)


def mask_digest(targets: Sequence[SparseTarget], masks: Sequence[torch.Tensor] | None = None) -> int:
    """A 62-bit digest of every full mask (names, shapes and values, in logical order), or of `masks` for them.

    Sharded masks (FSDP2) are gathered one at a time: then it is a collective, to call on every rank.
    """
    digest = hashlib.blake2b(digest_size=8)
    for i, t in enumerate(targets):
        digest.update(f"{t.name}{tuple(t.shape)}".encode())
        mask = t.full_mask() if masks is None else masks[i]
        digest.update(mask.detach().reshape(-1).cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 2


def check_sync(targets: Sequence[SparseTarget], *, raise_on_mismatch: bool = True, decision: int | None = None) -> bool:
    """Whether every rank holds the same masks (always True outside a distributed run).

    With `decision` (sharded masks, where ranks hold disjoint pieces): whether every rank decided the same
    full masks (`decision`, the digest of the full masks it computed at its last update) and the shards
    gathered now make exactly those.

    Raises:
        RuntimeError: the masks differ and `raise_on_mismatch` is set.
    """
    if not is_distributed():
        return True
    local = mask_digest(targets)
    device = targets[0].mask.device if dist.get_backend() == "nccl" else torch.device("cpu")
    values = [local] if decision is None else [local, decision]
    low = torch.tensor(values, dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    in_sync = low.tolist() == high.tolist() == [local] * len(values)
    if not in_sync and raise_on_mismatch:
        what = "masks" if decision is None else "sharded masks (the full masks each rank decided)"
        raise RuntimeError(f"dst_prune {what} differ across ranks (rank {dist.get_rank()} digest {local:#x}). "
                           f"Masks must depend only on synced weights, all-reduced scores and the seed.")
    return in_sync


def prepare_for_ddp(model: torch.nn.Module, targets: Sequence[SparseTarget],
                    ever_active: Sequence[torch.Tensor]) -> None:
    """`DynamicSparsity.prepare_for_ddp`: rank 0's masks on every rank, weights zero outside them, the ever-active
    bits restarted from them, and the masks kept out of DDP's buffer broadcast."""
    broadcast_masks(targets)
    for target, ever in zip(targets, ever_active):
        with torch.no_grad():
            zero_outside(target.orig, target.mask)
        target.refresh()
        ever.copy_(pack_bits(target.mask))
    ignore_masks_in_ddp(model, targets)
