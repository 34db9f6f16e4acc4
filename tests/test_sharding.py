"""`ShardLayout` index arithmetic, without processes: full flat indices to a shard's flat indices."""

from __future__ import annotations

import math

import torch

from dst_prune.distributed.fsdp import ShardLayout


def layout(shape: tuple[int, ...], offset: tuple[int, ...], local_shape: tuple[int, ...]) -> ShardLayout:
    return ShardLayout(shape, offset, local_shape)  # (no mesh needed for the index arithmetic)


def test_local_indices_match_the_shard_of_a_full_mask():
    generator = torch.Generator().manual_seed(0)
    for shape, offset, local_shape in [((33, 256), (17, 0), (16, 256)), ((33, 256), (0, 0), (17, 256)),
                                       ((16, 8, 3, 3), (8, 0, 0, 0), (8, 8, 3, 3)),
                                       ((6, 10, 4), (0, 5, 0), (6, 5, 4)), ((5, 4), (5, 0), (0, 4))]:
        full = torch.rand(shape, generator=generator) < 0.3
        indices = full.reshape(-1).nonzero().view(-1)
        shard = layout(shape, offset, local_shape)
        local, positions = shard.local_indices(indices, full)
        expected = shard.local_part(full).reshape(-1).nonzero().view(-1)
        assert torch.equal(local, expected)
        assert torch.equal(positions, shard.local_part(full))
        assert local.numel() <= math.prod(local_shape)
