"""Distributed training: masks that agree across DDP ranks (`ddp`), masks sharded like their weights under FSDP2
(`fsdp`), and checkpoints of sharded runs through `torch.distributed.checkpoint` (`checkpoint`)."""

from .ddp import all_reduce_mean, broadcast_masks, check_sync, ignore_masks_in_ddp, is_distributed, mask_digest

__all__ = ["all_reduce_mean", "broadcast_masks", "check_sync", "ignore_masks_in_ddp", "is_distributed", "mask_digest"]
