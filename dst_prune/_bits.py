"""Bit-packed masks: 1 bit per weight for the ever-active sets behind the in-time over-parameterization rate."""

from __future__ import annotations

import torch

__all__ = ["count_bits", "pack_bits", "packed_length", "unpack_bits"]

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The bool `mask` (any shape, row-major order) as `ceil(n / 8)` bytes, bit `i % 8` of byte `i // 8`."""
    flat = mask.reshape(-1)
    padded = torch.zeros((flat.numel() + 7) // 8 * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    lanes = padded.view(-1, 8)
    packed = lanes[:, 0].clone()
    for bit in range(1, 8):
        packed.bitwise_or_(lanes[:, bit] << bit)
    return packed


def count_bits(packed: torch.Tensor) -> int:
    """The number of set bits of a packed mask."""
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum())


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pack_bits`: a bool tensor of `shape`."""
    n = 1
    for size in shape:
        n *= size
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts).bitwise_and_(1).view(-1)[:n]
    return bits.to(torch.bool).view(shape)


def packed_length(numel: int) -> int:
    """The number of bytes `pack_bits` makes of `numel` bools."""
    return (numel + 7) // 8
