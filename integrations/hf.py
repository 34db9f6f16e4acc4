"""Dynamic sparse training inside Hugging Face's `transformers.Trainer`: one callback.

    from dst_prune.integrations.hf import DSTCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DSTCallback(sparsity=0.9, method="rigl")])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out")            # plain weights: AutoModel.from_pretrained("out") gives the trained model

The callback applies `dst_prune.apply` when the Trainer is built (before a resume loads weights into
the model), takes the Trainer's optimizer when training starts, sets `total_steps` from the Trainer's
`max_steps`, steps the controller once per optimizer step (after gradient accumulation; a step the fp16
loss scaler skipped is not counted), and saves the controller's state as `dst_state.pt` in every
`checkpoint-N` folder. Resuming restores it and refuses a checkpoint of a dense run or of other arguments.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .callback_core import SparseTraining

__all__ = ["DSTCallback"]

STATE_FILE = "dst_state.pt"


class DSTCallback(TrainerCallback):
    """`transformers.TrainerCallback` that trains the Trainer's model sparse.

    Args:
        **apply_arguments: `dst_prune.apply`'s keyword arguments (`sparsity` required; `optimizer` and, by
            default, `total_steps` come from the Trainer).

    Attributes:
        dst: the `dst_prune.DynamicSparsity` controller, once the Trainer is built.
    """

    def __init__(self, **apply_arguments: object) -> None:
        self.training = SparseTraining("transformers", apply_arguments)

    @property
    def dst(self):
        return self.training.dst

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.training.apply(model)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.training.start(optimizer, state.max_steps)
        if state.global_step > 0:  # resuming: the Trainer restored its state from checkpoint-<global_step>
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.training.load(folder / STATE_FILE, str(folder))

    def on_step_end(self, args, state, control, **kwargs):
        self.training.optimizer_step_done()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            self.training.save(folder / STATE_FILE)
