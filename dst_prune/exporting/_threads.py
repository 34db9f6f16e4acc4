"""How many threads the product of an exported sparse layer uses.

A sparse product does little work per call: a 4096 x 4096 layer at 90% sparsity is 1.7M multiply-adds per
input row, about a millisecond on one core. Split over torch's intra-op threads (OpenMP, and MKL's own
sparse kernels) it gains little on an idle machine, and on a machine where other processes compete for the
cores it collapses: every parallel region ends in a barrier that waits for the slowest thread, and a thread
the operating system has descheduled (or that spins while another one works) makes the call wait a whole
time slice. Measured on a loaded 2-core machine (torch's default 2 threads), a CSR matrix-vector product took
5x its one-thread time, and the condensed 3 x 4096 MLP went from 3.9x faster than dense at batch 1 to 1.1x.

So the exported sparse layers run their product with at most one thread per `GRAIN` multiply-adds (at least
one thread, at most torch's setting): batch-1 products run on one thread, large batches keep the threads
torch is set to. `torch.set_num_threads` is cheap (well under a microsecond) and, under OpenMP, acts on the
calling thread; it is restored when the product returns, also when it raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["GRAIN", "threads_for"]

#: multiply-adds per thread of a sparse product (about 4-8 ms of one core's work in a sparse gather)
GRAIN = 1 << 23


def threads_for(work: int, device: torch.device) -> contextlib.AbstractContextManager:
    """Run the block with at most `max(1, work // GRAIN)` of torch's intra-op threads on CPU (a no-op on other
    devices, and while `torch.compile` traces: the compiled code has its own threading).

    Args:
        work: the multiply-adds of the product (rows times stored weights).
        device: where the product runs.
    """
    if device.type != "cpu" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _at_most(work)


@contextlib.contextmanager
def _at_most(work: int) -> Iterator[None]:
    current = torch.get_num_threads()
    wanted = max(1, work // GRAIN)
    if wanted >= current:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(current)
