"""Resuming `scripts/train.py` with other flags: which may change, and applying the new values for real.

The flags that define what is trained (the model, the data, the sparsity and its method, the seed, the
batch, the processes, DDP or FSDP, the optimizer's kind) cannot change on resume: a checkpoint continued with another
value would be neither run. Changing one is refused with an error naming the flag, the checkpoint's value
and the new one. Every other flag takes its new value, logged as `--flag: old -> new`: the length of
training, the LR and its schedule, the optimizer's hyperparameters, the reallocation schedule, the
method's hyperparameters, logging, checkpointing, workers and timeouts.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from dst_prune.errors import DSTError

__all__ = ["IDENTITY_FLAGS", "apply_optimizer_flags", "compare_flags"]

#: flags (argparse destinations) that define the run; `processes` is the number of processes
IDENTITY_FLAGS = ("model", "pretrained", "model_kwargs", "dataset", "img_size", "num_classes", "train_subset",
                  "sparsity", "method", "distribution", "init", "sparse_stem_and_head", "exclude", "seed",
                  "batch_size", "grad_accum", "optimizer", "ema", "fsdp", "processes")


_NAMES = {"processes": "the number of processes",
          "double_at_fractions": "the script's default period doubling (fractions of training)"}


def _flag(key: str) -> str:
    return _NAMES.get(key, "--" + key.replace("_", "-"))


def _shown(value: object) -> str:
    return json.dumps(value)


def compare_flags(saved: dict, current: dict) -> list[str]:
    """Compare a checkpoint's flags (`args.json`) with this run's; return the changes as `--flag: old -> new`.

    Raises:
        DSTError: a flag that defines the run differs (each one named, with both values).
    """
    refused = [f"{_flag(k)} (the checkpoint has {_shown(saved[k])}, this run {_shown(current[k])})"
               for k in IDENTITY_FLAGS if k in saved and k in current and saved[k] != current[k]]
    if refused:
        raise DSTError(f"cannot resume with another {'; '.join(refused)}: these flags define the run. Resume with "
                       f"the checkpoint's values, or start a new run (another --output-dir, or --overwrite).")
    return [f"{_flag(k)}: {_shown(saved[k])} -> {_shown(current[k])}" for k in current
            if k not in IDENTITY_FLAGS and k in saved and saved[k] != current[k]]


def apply_optimizer_flags(optimizer: torch.optim.Optimizer, fresh_groups: list[dict], scheduler: object,
                          base_lr: float, lr_factor: Callable[[int], float]) -> None:
    """After loading a checkpoint: this run's optimizer hyperparameters, base LR and LR schedule, for real.

    `fresh_groups` are the parameter groups as this run's flags built them (before the checkpoint was
    loaded); their hyperparameters (momentum, weight decay, ...) replace the checkpoint's. The LR schedule
    restarts from `base_lr` at the checkpoint's step with this run's `lr_factor`, exactly as an
    uninterrupted run with these flags computes it (`base_lr * lr_factor(step)`), so unchanged flags
    change nothing.
    """
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        for key, value in fresh.items():
            if key not in ("params", "lr", "initial_lr"):
                group[key] = value
        group["initial_lr"] = base_lr
    scheduler.base_lrs = [base_lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = base_lr * lr_factor(scheduler.last_epoch)
