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

from .masking import SparseTarget

__all__ = ["all_reduce_mean", "check_sync", "is_distributed", "mask_digest"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average each tensor in place across ranks (scores that masks depend on; DESIGN.md rule 8)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(world)


def mask_digest(targets: Sequence[SparseTarget]) -> int:
    """A 62-bit digest of every mask (names, shapes and values, in logical order)."""
    digest = hashlib.blake2b(digest_size=8)
    for t in targets:
        digest.update(f"{t.name}{tuple(t.shape)}".encode())
        digest.update(t.mask.detach().reshape(-1).cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 2


def check_sync(targets: Sequence[SparseTarget], *, raise_on_mismatch: bool = True) -> bool:
    """Whether every rank holds the same masks (always True outside a distributed run).

    Raises:
        RuntimeError: the masks differ and `raise_on_mismatch` is set.
    """
    if not is_distributed():
        return True
    local = mask_digest(targets)
    device = targets[0].mask.device if dist.get_backend() == "nccl" else torch.device("cpu")
    low = torch.tensor([local], dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    in_sync = int(low) == int(high) == local
    if not in_sync and raise_on_mismatch:
        raise RuntimeError(f"dst_prune masks differ across ranks (rank {dist.get_rank()} digest {local:#x}). "
                           f"Masks must depend only on synced weights, all-reduced scores and the seed.")
    return in_sync
