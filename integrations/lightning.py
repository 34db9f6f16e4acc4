"""Dynamic sparse training inside Lightning: one callback.

    from dst_prune.integrations.lightning import DSTCallback

    trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[DSTCallback(sparsity=0.9, method="rigl")])
    trainer.fit(module)                  # or trainer.fit(module, ckpt_path="last.ckpt")
    MyModule.load_from_checkpoint(path)  # an untouched module: the checkpoint's state_dict is plain

The callback applies `dst_prune.apply` to the LightningModule in `setup` (before Lightning wraps it in DDP
or restores a checkpoint into it) and gives every rank rank 0's masks, takes every optimizer that holds
sparse parameters and `total_steps = trainer.estimated_stepping_batches` when training starts, steps the
controller once per training batch in which an optimizer stepped (a step the fp16 loss scaler skipped is
not counted), and keeps the controller's state (masks included) in the callback's slot of every Lightning
checkpoint. Its arguments are typed, so `LightningCLI` and YAML configs can build it.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback

from dst_prune.errors import DSTError

from .callback_core import SparseTraining

__all__ = ["DSTCallback"]


class DSTCallback(Callback):
    """`lightning.pytorch.Callback` that trains the LightningModule sparse.

    The arguments are `dst_prune.apply`'s (see there); `optimizer` and, by default, `total_steps` come from
    the Trainer.

    Args:
        sparsity: the fraction of zeros among the sparse parameters.
        method: the algorithm's registered name (`dst_prune.list_methods()`).
        distribution: `uniform`, `er`, `erk` or `global`.
        include: the parameters to make sparse (a regex, or a list of names or `.`-suffixes); None: the default.
        exclude: parameters to keep dense, in the same forms.
        dense_stem_and_head: keep the stem conv and the classifier dense.
        init: `magnitude` or `random`.
        granularity: `element`, `kernel`, `channel` or `n:m`.
        update_every: reallocate every this many optimizer steps.
        total_steps: the length of training in optimizer steps; None: from the Trainer.
        stop_fraction: stop reallocating at this fraction of `total_steps`; None: the method's default.
        stop_step: the same as an absolute step.
        double_at: steps from which the reallocation period doubles.
        seed: seeds every random draw.
        hyperparameters: the method's own (e.g. RigL's `drop_fraction`), as a mapping: the form a YAML config
            gives them in.
        **method_hyperparameters: the same as keyword arguments, `DSTCallback(sparsity=0.9, method="rigl",
            drop_fraction=0.3)`.

    Attributes:
        dst: the `dst_prune.DynamicSparsity` controller, once set up.
    """

    def __init__(self, *, sparsity: float, method: str = "dsr", distribution: str = "uniform",
                 include: str | list[str] | None = None, exclude: str | list[str] | None = None,
                 dense_stem_and_head: bool = True, init: str = "magnitude", granularity: str = "element",
                 update_every: int = 100, total_steps: int | None = None, stop_fraction: float | None = None,
                 stop_step: int | None = None, double_at: list[int] | None = None, seed: int = 0,
                 hyperparameters: dict[str, Any] | None = None, **method_hyperparameters: Any) -> None:
        arguments = {"sparsity": sparsity, "method": method, "distribution": distribution, "include": include,
                     "exclude": exclude, "dense_stem_and_head": dense_stem_and_head, "init": init,
                     "granularity": granularity, "update_every": update_every, "total_steps": total_steps,
                     "stop_fraction": stop_fraction, "stop_step": stop_step,
                     "double_at": tuple(double_at or ()), "seed": seed}
        own = dict(hyperparameters or {})
        if not isinstance(hyperparameters, (dict, type(None))):
            raise DSTError(f"hyperparameters must be a mapping of the method's own hyperparameters (e.g. "
                           f"{{'drop_fraction': 0.3}}); received {type(hyperparameters).__name__}.")
        clash = sorted((set(own) & set(method_hyperparameters)) | (set(own) & set(arguments)))
        if clash:
            raise DSTError(f"hyperparameters names {', '.join(map(repr, clash))}, which is also given as an argument "
                           f"of its own; give each once.")
        self.training = SparseTraining("lightning", {**arguments, **own, **method_hyperparameters})
        self._global_step = 0
        self._restored = False
        self._length_pending = False

    @property
    def dst(self):
        return self.training.dst

    @property
    def state_key(self) -> str:
        return "dst_prune.DSTCallback"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.training.apply(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        held = {id(t.orig) for t in self.dst.targets}
        optimizers = [o for o in trainer.optimizers if any(id(p) in held for g in o.param_groups for p in g["params"])]
        optimizer = None if not optimizers else optimizers[0] if len(optimizers) == 1 else tuple(optimizers)
        # manual optimization: Lightning's max_steps counts every optimizer.step() of a batch, the controller one
        # step per batch; the length follows from the first batch (see on_train_batch_end)
        self._length_pending = not pl_module.automatic_optimization and trainer.max_steps != -1
        self.training.start(optimizer, None if self._length_pending else _finite(trainer.estimated_stepping_batches))
        self._global_step = trainer.global_step
        if trainer.ckpt_path and not self._restored:
            raise DSTError(f"{trainer.ckpt_path} holds no dst_prune state: it was saved by a run without DSTCallback. "
                           f"Resume a sparse run's checkpoint, or start afresh.")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step > self._global_step:  # an optimizer step happened (after accumulation)
            if self._length_pending:
                self._length_pending = False
                self.training.start(self.dst.optimizer, _batches(trainer, trainer.global_step - self._global_step))
            self._global_step = trainer.global_step
            self.training.optimizer_step_done()

    def state_dict(self) -> dict:
        return {} if self.dst is None else self.dst.state_dict()  # on every rank (a collective under FSDP2)

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.training.restore(state_dict)
            self._restored = True


def _finite(steps: float) -> int | None:
    return None if steps == float("inf") else int(steps)


def _batches(trainer, steps_per_batch: int) -> int | None:
    """The training batches Lightning will run when each batch makes `steps_per_batch` optimizer steps."""
    by_steps = math.ceil(trainer.max_steps / steps_per_batch)
    if trainer.max_epochs is None or trainer.max_epochs == -1 or trainer.num_training_batches == float("inf"):
        return by_steps
    return min(by_steps, int(trainer.num_training_batches) * max(trainer.max_epochs, 1))
