"""Dynamic sparse training inside Lightning: one callback.

    from dst_prune.integrations.lightning import DSTCallback

    trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[DSTCallback(sparsity=0.9, method="rigl")])
    trainer.fit(module)                  # or trainer.fit(module, ckpt_path="last.ckpt")
    MyModule.load_from_checkpoint(path)  # an untouched module: the checkpoint's state_dict is plain

The callback applies `dst_prune.apply` to the LightningModule in `setup` (before Lightning wraps it in DDP
or restores a checkpoint into it) and gives every rank rank 0's masks, takes the optimizer and
`total_steps = trainer.estimated_stepping_batches` when training starts, steps the controller once per
optimizer step (a step the fp16 loss scaler skipped is not counted), and keeps the controller's state
(masks included) in the callback's slot of every Lightning checkpoint.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from dst_prune.errors import DSTError

from .callback_core import SparseTraining

__all__ = ["DSTCallback"]


class DSTCallback(Callback):
    """`lightning.pytorch.Callback` that trains the LightningModule sparse.

    Args:
        **apply_arguments: `dst_prune.apply`'s keyword arguments (`sparsity` required; `optimizer` and, by
            default, `total_steps` come from the Trainer).

    Attributes:
        dst: the `dst_prune.DynamicSparsity` controller, once set up.
    """

    def __init__(self, **apply_arguments: object) -> None:
        self.training = SparseTraining("lightning", apply_arguments)
        self._global_step = 0
        self._restored = False

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
        self.training.start(optimizers[0] if optimizers else None, trainer.estimated_stepping_batches)
        self._global_step = trainer.global_step
        if trainer.ckpt_path and not self._restored:
            raise DSTError(f"{trainer.ckpt_path} holds no dst_prune state: it was saved by a run without DSTCallback. "
                           f"Resume a sparse run's checkpoint, or start afresh.")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step > self._global_step:  # an optimizer step happened (after accumulation)
            self._global_step = trainer.global_step
            self.training.optimizer_step_done()

    def state_dict(self) -> dict:
        return {} if self.dst is None else self.dst.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.dst.load_state_dict(state_dict)
            self._restored = True
