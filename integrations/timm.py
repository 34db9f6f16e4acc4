"""Dynamic sparse training in timm's own `train.py`: the few lines of the patch, and their checks.

The patch to timm's script (the full diff is in the docs, "timm"):

    from dst_prune.integrations import timm as dst_timm
    ...
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    dst = dst_timm.apply(model, optimizer=optimizer, epochs=num_epochs, updates_per_epoch=updates_per_epoch,
                         sparsity=0.9, method="rigl")                         # before resume, EMA and DDP
    resume_epoch = resume_checkpoint(model, args.resume, optimizer=optimizer, ...)   # timm's, unchanged
    dst_timm.resume(dst, args.resume)                                          # the controller's state
    model_ema = ModelEmaV3(model, ...); dst_timm.track_ema(dst, model_ema)     # EMA masked after each update
    saver = dst_timm.SparseCheckpointSaver(dst, model=model, optimizer=optimizer, ...)   # for CheckpointSaver
    ...  # in train_one_epoch, after each optimizer step: dst.step()

The controller's state travels inside timm's checkpoint dict (under the saver's own entry,
`checkpoint["saver"]["dst_prune"]`); the model's `state_dict` in it is plain, so `validate.py`,
`timm.create_model(..., checkpoint_path=...)` and `load_checkpoint` load it into an untouched model.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from timm.utils import CheckpointSaver
from torch import nn

import dst_prune
from dst_prune.errors import DSTError

__all__ = ["SparseCheckpointSaver", "apply", "checkpoint_state", "resume", "track_ema"]

KEY = "dst_prune"


def apply(model: nn.Module, *, optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int,
          **apply_arguments: object) -> dst_prune.DynamicSparsity:
    """`dst_prune.apply` with `total_steps = epochs * updates_per_epoch` (timm's optimizer updates), then
    `prepare_for_ddp()`.

    Raises:
        DSTError: the model is already wrapped in DistributedDataParallel (apply first, then wrap), or any
            `apply` error.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise DSTError("the model is already wrapped in DistributedDataParallel: call dst_timm.apply on the bare "
                       "model, before timm's script wraps it (and before resume_checkpoint and ModelEmaV3).")
    apply_arguments.setdefault("total_steps", int(epochs * updates_per_epoch))
    dst = dst_prune.apply(model, optimizer=optimizer, **apply_arguments)
    dst.prepare_for_ddp()
    return dst


def track_ema(dst: dst_prune.DynamicSparsity, model_ema: nn.Module) -> None:
    """Keep timm's `ModelEmaV3` (or `ModelEmaV2`) on the controller's masks: after every update its weights are
    zero outside them. The EMA must be created after `apply` (it copies the sparse model)."""
    module = getattr(model_ema, "module", model_ema)
    if not dst_prune.is_sparse(module):
        raise DSTError("model_ema is a copy of the model from before dst_prune.apply: create ModelEmaV3(model) after "
                       "dst_timm.apply, so that it copies the sparse model.")
    dst.add_copy(module)


class SparseCheckpointSaver(CheckpointSaver):
    """timm's `CheckpointSaver` that also stores the controller's state in every checkpoint it writes.

    Args:
        dst: the controller.
        *args, **kwargs: `timm.utils.CheckpointSaver`'s.
    """

    def __init__(self, dst: dst_prune.DynamicSparsity, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.dst = dst

    def state_dict(self, epoch=None, metric=None):
        return {**super().state_dict(epoch, metric), KEY: self.dst.state_dict()}


def _safe_globals():
    """Allow argparse.Namespace (timm stores its args) in `weights_only` loading, and nothing else."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])  # torch 2.4: no context manager yet
    return contextlib.nullcontext()


def checkpoint_state(path: str | Path) -> dict:
    """The controller's state in a timm checkpoint, read without unpickling objects.

    Raises:
        DSTError: the file cannot be read as tensors and plain values, or holds no dst_prune state.
    """
    try:
        with _safe_globals():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DSTError(f"{path} cannot be read as tensors and plain values ({type(error).__name__}); it is "
                       f"refused.") from None
    state = checkpoint.get("saver", {}).get(KEY) if isinstance(checkpoint, dict) else None
    if state is None:
        raise DSTError(f"{path} holds no dst_prune state: it was saved without SparseCheckpointSaver (a dense run, or "
                       f"an older script). Resume a sparse run's checkpoint, or start afresh.")
    return state


def resume(dst: dst_prune.DynamicSparsity, path: str | Path | None) -> None:
    """Restore the controller from timm checkpoint `path` (nothing when `path` is empty, as timm's `--resume`)."""
    if path:
        dst.load_state_dict(checkpoint_state(path))
