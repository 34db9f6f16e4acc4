"""Small reusable buffers for chunked elementwise passes over weight-sized tensors.

A weight-sized temporary (`w.abs()` of a 4096 x 4096 layer: 64 MiB) is a fresh allocation at every call, which
on Linux means fresh pages from the kernel and a page fault per 4 KiB on first touch: in a topology update that
was most of the cost of the op itself (13 ms for `abs` of 4M weights in the update, 1.4 ms on a warm buffer).
Passes that only need the temporary briefly run in chunks of `CHUNK` elements through one buffer per thread,
dtype and device, kept for the next call (1 MiB for float32).
"""

from __future__ import annotations

import threading

import torch

__all__ = ["CHUNK", "scratch"]

#: elements per chunk of a chunked pass
CHUNK = 1 << 18
_buffers = threading.local()  # per thread: {(dtype, device): buffer}


def scratch(dtype: torch.dtype, device: torch.device, size: int) -> torch.Tensor:
    """A buffer of `size` elements (uninitialised) of this thread's, reused by the next call with the same dtype
    and device: use it before calling anything that may ask for it again."""
    try:
        cache = _buffers.cache
    except AttributeError:
        cache = _buffers.cache = {}
    buffer = cache.get((dtype, device))
    if buffer is None or buffer.numel() < size:
        buffer = cache[(dtype, device)] = torch.empty(size, dtype=dtype, device=device)
    return buffer[:size]
