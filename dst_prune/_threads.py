"""How many intra-op threads a short burst of work uses: an exported sparse layer's product, a topology update.

Both are many small operations, each of which torch splits over its intra-op threads (OpenMP, and MKL's own
sparse kernels) with a barrier at its end. On an idle machine that gains little (a 4096 x 4096 layer at 90%
sparsity is 1.7M multiply-adds per input row, about a millisecond on one core; an update's passes are
memory-bound); on a machine where other processes compete for the cores it collapses: every barrier waits for
the slowest thread, and a thread the operating system has descheduled (or that spins while another one works)
makes the call wait a whole time slice. Measured on a loaded 2-core machine with torch's default 2 threads: a
CSR matrix-vector product took 5x its one-thread time, the condensed 3 x 4096 MLP went from 3.9x faster than
dense at batch 1 to 1.1x, and one RigL update over 25M weights took 4.2 s against 0.8 s on one thread.

So the exported sparse layers run their product with at most one thread per `GRAIN` multiply-adds, and a
topology update with at most one thread per `UPDATE_GRAIN` weights of its largest tensor (at least one thread,
at most torch's setting): batch-1 products and updates of ordinary layers run on one thread, large batches
and huge layers keep the threads torch is set to. `torch.set_num_threads` is cheap (well under a
microsecond) and, under OpenMP, acts on the calling thread; the setting is restored when the block ends, also
when it raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["GRAIN", "UPDATE_GRAIN", "threads_for"]

#: multiply-adds per thread of a sparse product (about 4-8 ms of one core's work in a sparse gather)
GRAIN = 1 << 23
#: weights of the largest tensor per thread of a topology update (a pass over 16M weights: 10-30 ms on one core)
UPDATE_GRAIN = 1 << 24


def threads_for(work: int, device: torch.device, grain: int = GRAIN) -> contextlib.AbstractContextManager:
    """Run the block with at most `max(1, work // grain)` of torch's intra-op threads on CPU (a no-op on other
    devices, and while `torch.compile` traces: the compiled code has its own threading).

    Args:
        work: the work of the block (multiply-adds of a product; weights of an update's largest tensor).
        device: where it runs.
        grain: the work per thread.
    """
    if device.type != "cpu" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _at_most(max(1, work // grain))


@contextlib.contextmanager
def _at_most(wanted: int) -> Iterator[None]:
    current = torch.get_num_threads()
    if wanted >= current:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(current)
