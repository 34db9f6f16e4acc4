"""The training script's own state as JSON values: what a sharded (DCP) checkpoint of `scripts/train.py` keeps
in its `extra` (`dst_prune.distributed.checkpoint.save(..., extra=...)`), inside the same atomic checkpoint.

| key | what |
| --- | --- |
| `progress` | `TrainingProgress.state_dict()` (epoch, batch, optimizer steps, micro-batches, losses not logged yet) |
| `scheduler` | the LR schedule's `state_dict()` |
| `rng` | every rank's random generator states (torch, Python, numpy, CUDA), in rank order |
| `args` | the run's flags, for the resume rule of `scripts/train_resume.py` |

`training_extra` builds it (a collective: every rank's generator states are gathered); `check_training_extra`
checks everything against the live scheduler and progress, as `load_checkpoint` checks its files, and raises a
`DSTError` naming the entry before anything is loaded; `load_training_extra` then sets it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..distributed._dcp_agreement import gather_json
from ..errors import DSTError
from ._checkpoint_files import check_rng_state, check_scheduler_state
from .checkpoints import TrainingProgress, _rng_state, _set_rng_state

__all__ = ["CheckedExtra", "check_training_extra", "load_training_extra", "training_extra"]

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _rng_json() -> dict:
    """This process's generator states as JSON values (tensors as lists of integers)."""
    state = _rng_state()
    state["torch"] = state["torch"].tolist()
    state["numpy_keys"] = state["numpy_keys"].tolist()
    if "cuda" in state:
        state["cuda"] = [t.tolist() for t in state["cuda"]]
    return state


def _byte_tensor(value: object, where: str) -> torch.Tensor:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 256
                                              for v in value):
        raise DSTError(f"{where} is not a list of bytes (integers in [0, 256)); the checkpoint's extra is damaged.")
    return torch.tensor(value, dtype=torch.uint8)


def _rng_from_json(state: object, where: str) -> dict:
    """The generator states of one rank back as tensors, checked (`check_rng_state`)."""
    if not isinstance(state, dict) or not isinstance(state.get("numpy_keys"), list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in state["numpy_keys"]):
        raise DSTError(f"{where} holds no random number generator state (torch, python, numpy).")
    converted = {**state, "torch": _byte_tensor(state.get("torch"), f"{where}['torch']"),
                 "numpy_keys": torch.tensor(state["numpy_keys"], dtype=torch.int64)}
    if "cuda" in state:
        if not isinstance(state["cuda"], list):
            raise DSTError(f"{where}['cuda'] is not a list of CUDA generator states.")
        converted["cuda"] = [_byte_tensor(v, f"{where}['cuda'][{i}]") for i, v in enumerate(state["cuda"])]
    check_rng_state(where, converted)
    return converted


def _losses_json(losses: list[float]) -> list:
    """Losses as JSON numbers; a non-finite one (a diverged step) as the string 'nan', 'inf' or '-inf'."""
    return [v if math.isfinite(v) else repr(v) for v in losses]


def training_extra(*, scheduler: object, progress: TrainingProgress, run_args: dict) -> dict:
    """The script's state as JSON values (a collective under several processes: call it on every rank).

    Args:
        scheduler: the LR schedule (its `state_dict()` must be JSON values, as `LambdaLR`'s with a function is).
        progress: where training is.
        run_args: the run's flags as JSON values.
    """
    progress_state = progress.state_dict()
    progress_state["unlogged_losses"] = _losses_json(progress_state["unlogged_losses"])
    return {"progress": progress_state, "scheduler": scheduler.state_dict(), "rng": gather_json(_rng_json()),
            "args": run_args}


@dataclass
class CheckedExtra:
    """The entries of a checkpoint's extra, checked: ready for `load_training_extra`."""

    progress: dict
    scheduler: dict
    rng: list[dict]
    args: dict


def check_training_extra(where: str, extra: object, *, scheduler: object, progress: TrainingProgress,
                         world_size: int, steps: int) -> CheckedExtra:
    """Check a checkpoint's extra against the live run; change nothing.

    Args:
        where: the file it was read from (named in errors).
        world_size: this run's number of processes (one generator state per rank is expected).
        steps: the optimizer steps of the checkpoint's controller.

    Raises:
        DSTError: naming the entry that is missing, malformed or of another step or number of processes.
    """
    if not isinstance(extra, dict) or not {"progress", "scheduler", "rng", "args"} <= set(extra):
        keys = sorted(extra) if isinstance(extra, dict) else type(extra).__name__
        raise DSTError(f"{where} holds {keys}; expected the training script's progress, scheduler, rng and args: "
                       f"the checkpoint was not written by scripts/train.py --fsdp.")
    state = extra["progress"]
    if isinstance(state, dict) and isinstance(state.get("unlogged_losses"), list):
        state = {**state, "unlogged_losses": [_NON_FINITE.get(v, v) if isinstance(v, str) else v
                                              for v in state["unlogged_losses"]]}
    progress.check(state, where=f"{where}: the entry progress")
    if state["optimizer_steps"] != steps:
        raise DSTError(f"{where}: the progress is at optimizer step {state['optimizer_steps']}, the controller at "
                       f"step {steps}: the entries are of different saves.")
    check_scheduler_state(f"{where}: the entry scheduler", extra["scheduler"], scheduler, steps)
    if not isinstance(extra["rng"], list) or len(extra["rng"]) != world_size:
        count = len(extra["rng"]) if isinstance(extra["rng"], list) else extra["rng"]
        raise DSTError(f"{where}: the entry rng holds the generator states of {count} processes; this run has "
                       f"{world_size}. Resume with the number of processes the checkpoint was saved by.")
    rng = [_rng_from_json(r, f"{where}: the entry rng[{i}]") for i, r in enumerate(extra["rng"])]
    if not isinstance(extra["args"], dict):
        raise DSTError(f"{where}: the entry args is not the run's flags (a JSON object).")
    return CheckedExtra(state, extra["scheduler"], rng, extra["args"])


def load_training_extra(checked: CheckedExtra, *, scheduler: object, progress: TrainingProgress, rank: int) -> None:
    """Set the LR schedule, the progress and this rank's generator states from a checked extra."""
    scheduler.load_state_dict(checked.scheduler)
    progress.load_state_dict(checked.progress)
    _set_rng_state(checked.rng[rank])
