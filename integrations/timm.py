"""Dynamic sparse training in timm's own `train.py`: the few lines of the patch, and their checks.

The patch (`docs/examples/timm_train.patch`, a unified diff for the task-based `train.py` of timm 1.0.27 and
later; the docs list where the lines go in older scripts) adds 15 lines:

    from dst_prune.integrations import timm as dst_timm
    group = parser.add_argument_group(...)        # --sparsity, --sparse-method, --sparse-update-every
    ...
    dst = dst_timm.apply(model, optimizer=optimizer, sparsity=args.sparsity, ...)   # after create_optimizer_v2
    if args.resume:
        dst_timm.resume(dst, args.resume)           # before resume_task_checkpoint: checked, then the masks
    ...
        dst_timm.track_ema(dst, task)               # after task.setup_ema: the EMA copy follows the masks
    saver = dst_timm.SparseCheckpointSaver(dst, model=model, optimizer=optimizer, ..., task=task)
    ...
    dst.set_total_steps(num_epochs * updates_per_epoch)   # after create_scheduler_v2
    train_one_epoch(..., task=task, dst=dst, ...)   # and `dst=None` in its signature
        dst_timm.step(dst)                          # after each optimizer update, before task.update_ema

The controller's state travels in timm's checkpoint dict under `checkpoint["dst_prune"]`, beside the plain model
state dicts, so `validate.py`, `timm.create_model(..., checkpoint_path=...)` and `load_checkpoint` load the
weights into an untouched model.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import weakref
from pathlib import Path

import torch
from timm.utils import CheckpointSaver
from timm.utils.model import get_state_dict, unwrap_model
from torch import nn

import dst_prune
from dst_prune._optimizer_state import unwrap_optimizer
from dst_prune.errors import DSTError

from .callback_core import _UNKNOWN_LENGTH, adopt_saved_length

__all__ = ["SparseCheckpointSaver", "apply", "checkpoint_state", "resume", "step", "track_ema"]

logger = logging.getLogger(__name__)

KEY = "dst_prune"
#: a stand-in for the length of training until `set_total_steps` gives it (`step` refuses to run on it)


class _Updates:
    """Whether the optimizer really stepped since the last `step()`: a step post-hook on it (a step that the fp16
    loss scaler skipped calls no `optimizer.step()`)."""

    def __init__(self, optimizer: object, length_given: bool) -> None:
        self.stepped, self.length_given = False, length_given
        inner = unwrap_optimizer(optimizer)
        self.counted = inner is not None
        if self.counted:
            inner.register_step_post_hook(self._count)

    def _count(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self.stepped = True


_UPDATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply(model: nn.Module, *, optimizer: torch.optim.Optimizer, epochs: int | None = None,
          updates_per_epoch: int | None = None, **apply_arguments: object) -> dst_prune.DynamicSparsity:
    """`dst_prune.apply` for timm's `train.py`, then `prepare_for_ddp()`.

    The length of training is not known yet where the patch calls this (timm computes `updates_per_epoch` and
    `num_epochs` hundreds of lines later): give it with `dst.set_total_steps(num_epochs * updates_per_epoch)` once
    they exist; `step` refuses to run until then. `total_steps=...`, or `epochs` with `updates_per_epoch`, give it
    now instead.

    Raises:
        DSTError: the model is already wrapped in DistributedDataParallel (apply first, then wrap), or any
            `apply` error.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise DSTError("the model is already wrapped in DistributedDataParallel: call dst_timm.apply on the bare "
                       "model, before timm's script wraps it (and before resume_task_checkpoint and the EMA).")
    if (epochs is None) != (updates_per_epoch is None):
        raise DSTError(f"epochs={epochs!r} and updates_per_epoch={updates_per_epoch!r}: give both (total_steps = "
                       f"epochs * updates_per_epoch) or neither (then call dst.set_total_steps later).")
    if epochs is not None:
        apply_arguments.setdefault("total_steps", int(epochs * updates_per_epoch))
    length_given = apply_arguments.get("total_steps") is not None
    if not length_given:
        apply_arguments["total_steps"] = _UNKNOWN_LENGTH
    dst = dst_prune.apply(model, optimizer=optimizer, **apply_arguments)
    dst.prepare_for_ddp()
    _UPDATES[dst] = _Updates(optimizer, length_given)
    return dst


def step(dst: dst_prune.DynamicSparsity | None) -> bool:
    """Count the optimizer update `train_one_epoch` just made (a step the fp16 loss scaler skipped is not
    counted) and reallocate when the schedule says so. Returns whether it did.

    Raises:
        DSTError: `dst` is None (`train_one_epoch` was not given `dst=dst`), or the length of training was never
            given (`dst.set_total_steps(num_epochs * updates_per_epoch)` after `create_scheduler_v2`).
    """
    if dst is None:
        raise DSTError("train_one_epoch got no controller: pass dst=dst in the call of train_one_epoch (and add "
                       "dst=None to its signature), as the patch does.")
    updates = _UPDATES.get(dst)
    if updates is not None and not updates.length_given and dst.total_steps == _UNKNOWN_LENGTH:
        raise DSTError("the length of training was never given: call dst.set_total_steps(num_epochs * "
                       "updates_per_epoch) after create_scheduler_v2 (RigL's schedule and stop step follow from it).")
    skipped = updates is not None and updates.counted and not updates.stepped
    if updates is not None:
        updates.stepped = False
    if skipped:
        logger.warning("dst_prune: the optimizer given to dst_timm.apply did not step since the last update (the "
                       "fp16 loss scaler skipped it); not counted, at step %d", dst.step_count)
    return dst.step(skipped=skipped)


def track_ema(dst: dst_prune.DynamicSparsity, ema: object) -> None:
    """Keep the EMA copy of the model on the controller's masks: after every update its weights are zero outside
    them.

    Args:
        dst: the controller.
        ema: timm's training task (its EMA, `task.get_trainable_module(ema=True)`, as `task.setup_ema` made it), or
            a `ModelEmaV3`/`ModelEmaV2`, or any deep copy of the sparse model.

    Raises:
        DSTError: the task has no EMA yet, or the EMA was made before `apply` (a dense copy).
    """
    if hasattr(ema, "get_trainable_module"):
        task = ema
        ema = task.get_trainable_module(ema=True)
        if ema is None:
            raise DSTError("the task has no EMA: call dst_timm.track_ema(dst, task) after task.setup_ema(...), inside "
                           "train.py's `if args.model_ema:` block.")
    module = getattr(ema, "module", ema)
    if not isinstance(module, nn.Module) or not dst_prune.is_sparse(module):
        raise DSTError("the EMA is a copy of the model from before dst_prune.apply: set up the EMA (task.setup_ema, "
                       "ModelEmaV3(model)) after dst_timm.apply, so that it copies the sparse model.")
    dst.add_copy(module)


class _WithController:
    """What timm's `CheckpointSaver` asks its `task` for (`get_checkpoint_state`), plus the controller's state.

    Without a task, it gives the model's and the EMA's state dicts as `CheckpointSaver` does itself.
    """

    def __init__(self, dst: dst_prune.DynamicSparsity, task: object, model: nn.Module, model_ema: object) -> None:
        self.dst, self.task, self.model, self.model_ema = dst, task, model, model_ema

    def __getattr__(self, name: str) -> object:
        if self.task is None:
            raise AttributeError(name)
        return getattr(self.task, name)

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn=unwrap_model) -> dict:
        if self.task is not None:
            state = dict(self.task.get_checkpoint_state(ema=ema, unwrap_fn=unwrap_fn))
        else:
            module = self.model_ema if ema else self.model
            state = {} if module is None else {"state_dict_ema" if ema else "state_dict": get_state_dict(module,
                                                                                                     unwrap_fn)}
        if not ema:
            state[KEY] = self.dst.state_dict()
        return state


class SparseCheckpointSaver(CheckpointSaver):
    """timm's `CheckpointSaver` that also stores the controller's state in every checkpoint it writes (the numbered
    ones, `last`, `model_best` and the recovery files), as `checkpoint["dst_prune"]`.

    Args:
        dst: the controller.
        *args, **kwargs: `timm.utils.CheckpointSaver`'s (with or without `task=`).

    Raises:
        DSTError: timm older than 1.0.27, whose `CheckpointSaver` has no `task` to carry extra state.
    """

    def __init__(self, dst: dst_prune.DynamicSparsity, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self, "task"):
            import timm

            raise DSTError(f"timm {timm.__version__}'s CheckpointSaver has no task= to carry the controller's state "
                           f"(timm 1.0.27 added it): upgrade timm, or save dst.state_dict() yourself next to each "
                           f"checkpoint.")
        self.dst = dst
        self.task = _WithController(dst, self.task, self.model, self.model_ema)


def _safe_globals():
    """Allow argparse.Namespace (timm stores its args) in `weights_only` loading, and nothing else."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])  # torch 2.4: no context manager yet
    return contextlib.nullcontext()


def _read(path: str | Path) -> dict:
    try:
        with _safe_globals():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DSTError(f"{path} cannot be read as tensors and plain values ({type(error).__name__}); it is "
                       f"refused.") from None
    if not isinstance(checkpoint, dict):
        raise DSTError(f"{path} is not a timm training checkpoint (a dict); it is refused.")
    return checkpoint


def _controller(checkpoint: dict, path: str | Path) -> dict:
    state = checkpoint.get(KEY)
    if state is None and isinstance(checkpoint.get("saver"), dict):  # written by an earlier SparseCheckpointSaver
        state = checkpoint["saver"].get(KEY)
    if state is None:
        raise DSTError(f"{path} holds no dst_prune state: it was saved without SparseCheckpointSaver (a dense run, or "
                       f"an older script). Resume a sparse run's checkpoint, or start afresh.")
    return state


def checkpoint_state(path: str | Path) -> dict:
    """The controller's state in a timm checkpoint, read without unpickling objects.

    Raises:
        DSTError: the file cannot be read as tensors and plain values, or holds no dst_prune state.
    """
    return _controller(_read(path), path)


def resume(dst: dst_prune.DynamicSparsity, path: str | Path | None) -> None:
    """Restore the controller from timm checkpoint `path` (nothing when `path` is empty, as timm's `--resume`).

    Call it before `resume_task_checkpoint` loads the weights: it checks the controller's state and that the
    checkpoint's weights are zero outside its masks before it changes anything, so a checkpoint it refuses was not
    half loaded. (Called after timm's loader, it restores the same state.)

    Raises:
        DSTError: unreadable file, no dst_prune state, a state of another configuration, or weights that do not
            fit its masks (a mixed or corrupted checkpoint); nothing is changed.
    """
    if not path:
        return
    checkpoint = _read(path)
    state = _controller(checkpoint, path)
    try:
        dst.check_state_dict(state)
    except DSTError as error:
        raise DSTError(f"{path}: {error}") from None
    for key in ("state_dict", "state_dict_ema"):
        weights = checkpoint.get(key)
        try:
            if isinstance(weights, dict):
                dst.check_weights({k.removeprefix("module."): v for k, v in weights.items()}, state)
        except DSTError as error:
            raise DSTError(f"{path}, {key}: {error}") from None
    updates = _UPDATES.get(dst)
    adopt_saved_length(dst, state, explicit=updates is None or updates.length_given)
    dst.load_state_dict(state)
    logger.info("dst_prune: resumed the controller from %s at step %d", path, dst.step_count)
