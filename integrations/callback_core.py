"""What the trainer callbacks share: `apply` at the right moment, the optimizer handed over, the length of
training set once known, and one `dst.step()` per optimizer step that really happened.

A step the fp16 loss scaler skipped calls no `optimizer.step()` of the underlying `torch.optim.Optimizer`,
so a step post-hook on it tells real steps from skipped ones, whatever wraps the optimizer (accelerate,
Lightning's precision plugins).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

import dst_prune
from dst_prune._optimizer_state import Optimizers, unwrap_optimizer
from dst_prune._validation import check_number
from dst_prune.algorithms import create_algorithm
from dst_prune.errors import DSTError

__all__ = ["SparseTraining", "adopt_saved_length"]

logger = logging.getLogger(__name__)

#: a stand-in for the length of training until the trainer knows it (replaced before the first step)
_UNKNOWN_LENGTH = 10**9


def adopt_saved_length(dst: dst_prune.DynamicSparsity, state: object, *, explicit: bool) -> None:
    """Before resuming: a controller whose length of training is still the stand-in takes the saved run's.

    Checked first (`check_state_dict`), so a state that would be refused changes nothing.
    """
    saved = state.get("total_steps") if isinstance(state, dict) else None
    if explicit or dst.step_count or not isinstance(saved, int) or dst.total_steps != _UNKNOWN_LENGTH:
        return
    dst.check_state_dict(state)
    dst.set_total_steps(saved)


class SparseTraining:
    """`dst_prune.apply`'s arguments, checked now, applied later by a callback.

    Attributes:
        dst: the controller, once applied.
    """

    def __init__(self, framework: str, apply_arguments: dict) -> None:
        if "sparsity" not in apply_arguments:
            raise DSTError(f"{framework} DSTCallback needs sparsity=..., e.g. DSTCallback(sparsity=0.9).")
        check_number(apply_arguments["sparsity"], "sparsity", low=0.0, high=1.0)
        arguments = dict(apply_arguments)
        method = arguments.get("method", "dsr")
        known = {"sparsity", "method", "distribution", "include", "exclude", "dense_stem_and_head", "init",
                 "granularity", "update_every", "total_steps", "stop_fraction", "stop_step", "double_at", "seed"}
        if "optimizer" in arguments:
            raise DSTError(f"{framework} DSTCallback takes the trainer's optimizer itself; do not pass optimizer=.")
        hyperparameters = {k: v for k, v in arguments.items() if k not in known}
        if isinstance(method, str):
            create_algorithm(method, hyperparameters)  # unknown methods and hyperparameters fail here, early
        self.framework, self.arguments, self.dst = framework, arguments, None
        self._stepped = False
        self._hooks: list = []

    def apply(self, model: nn.Module) -> dst_prune.DynamicSparsity:
        """Make `model` sparse (once); gives every rank rank 0's masks."""
        if self.dst is not None:
            return self.dst
        if dst_prune.is_sparse(model):
            raise DSTError(f"the model is already sparse; {self.framework} DSTCallback applies dst_prune itself. Pass "
                           f"the model before dst_prune.apply (or drop the callback and step the controller yourself).")
        arguments = dict(self.arguments)
        self.explicit_length = arguments.get("total_steps") is not None
        arguments.setdefault("total_steps", None)
        if arguments["total_steps"] is None:
            arguments["total_steps"] = _UNKNOWN_LENGTH
        self.dst = dst_prune.apply(model, **arguments)
        self.dst.prepare_for_ddp()
        return self.dst

    def start(self, optimizer: object, total_steps: int | None) -> None:
        """Hand over the trainer's optimizer (or a list of those that hold sparse parameters) and the length of
        training (when training starts)."""
        self.dst.optimizer = optimizer
        if not self.explicit_length and total_steps:
            self.dst.set_total_steps(int(total_steps))
        inner = unwrap_optimizer(optimizer)
        for hook in self._hooks:
            hook.remove()
        inners = inner.optimizers if isinstance(inner, Optimizers) else () if inner is None else (inner,)
        self._hooks = [o.register_step_post_hook(self._count) for o in inners]

    def _count(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self._stepped = True

    def optimizer_step_done(self) -> bool:
        """After the trainer's optimizer step: count it (or discard it if the loss scaler skipped it).

        Returns whether the controller reallocated.
        """
        skipped, self._stepped = not self._stepped, False
        return self.dst.step(skipped=skipped)

    # --- the controller's state in a checkpoint folder ------------------------------------------------
    def save(self, path: Path) -> None:
        """Write `dst.state_dict()` to `path` (a collective under FSDP2: call it on every rank)."""
        self.write(self.dst.state_dict(), path)

    @staticmethod
    def write(state: dict, path: Path) -> None:
        """Write a controller state to `path` atomically (a temporary file renamed over it)."""
        temporary = path.with_name(f".{path.name}.partial")
        torch.save(state, temporary)
        temporary.replace(path)

    def load(self, path: Path, what: str) -> None:
        """Restore the controller from `path`, refusing a checkpoint of a dense run or of another configuration."""
        if not path.is_file():
            raise DSTError(f"{what} has no {path.name}: it was saved by a run without dst_prune (or its save was "
                           f"interrupted). Resume a sparse run's checkpoint, or start afresh.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise DSTError(f"{path} cannot be read as tensors and plain values ({type(error).__name__}); it is "
                           f"refused.") from None
        self.restore(state)
        logger.info("dst_prune: resumed the controller from %s at step %d", path, self.dst.step_count)

    def restore(self, state: dict) -> None:
        """Load a controller state; a controller applied before the trainer knew the length of training takes the
        saved run's first (the trainer's own, set when training starts, may still change it, logged)."""
        adopt_saved_length(self.dst, state, explicit=self.explicit_length)
        self.dst.load_state_dict(state)
