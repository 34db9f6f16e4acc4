"""Ranks that agree on every outcome of a checkpoint step: the same result, or the same `DSTError`, everywhere.

A checkpoint is written and read by every rank, and a failure (a missing file, a wrong hash, DCP's
`CheckpointException`) may happen on one rank only. Each step runs locally, then the ranks exchange their
outcome (a collective that every rank reaches, failed or not), so no rank is left waiting in a collective of
the next step and every rank raises the same `DSTError`, that of the lowest failing rank.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

import torch

from ..errors import DSTError

__all__ = ["agreed", "gather_json", "is_distributed", "rank", "refusing", "world_size"]

T = TypeVar("T")


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def _gather_text(text: str) -> list[str]:
    """Every rank's string (a collective; plain bytes, nothing unpickled)."""
    import torch.distributed as dist

    if not is_distributed():
        return [text]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    size = max(1, *(int(n) for n in lengths))
    padded = torch.zeros(size, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data.to(device)
    gathered = [torch.zeros_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded)
    return [bytes(g[:int(n)].cpu().tolist()).decode() for g, n in zip(gathered, lengths)]


def gather_json(value: object) -> list:
    """Every rank's JSON-able `value`, in rank order (a collective)."""
    return [json.loads(text) for text in _gather_text(json.dumps(value))]


def _failed(error: BaseException) -> tuple[BaseException, int]:
    """The error and the rank it happened on; for DCP's `CheckpointException`, that of its lowest failing rank."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        return (first[0] if isinstance(first, tuple) else first), min(failures)
    return error, rank()


def _run(action: Callable[[], T], what: str, collective: bool) -> tuple[T | None, str, BaseException | None]:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return action(), "", None
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        inner, failed_rank = _failed(error)
        message = str(inner) if isinstance(inner, DSTError) else \
            f"{what}: {type(inner).__name__}: {str(inner).strip()[:400]}"
        if collective and world_size() > 1:
            message += f" (on rank {failed_rank} of {world_size()})"
        return None, message, error


def refusing(action: Callable[[], T], what: str) -> T:
    """Run `action` on this process only; any failure becomes a `DSTError` (`what` says what was being done)."""
    result, failure, error = _run(action, what, collective=False)
    if failure:
        raise DSTError(failure) from error
    return result


def agreed(action: Callable[[], T], what: str) -> T:
    """Run `action` on every rank (a collective); if it failed anywhere, every rank raises the same `DSTError`."""
    result, failure, error = _run(action, what, collective=True)
    failures = _gather_text(failure)
    for message in failures:  # the lowest rank's account
        if message:
            raise DSTError(message) from error
    return result
