"""Dynamic sparse training inside Hugging Face's `transformers.Trainer`: one callback.

    from dst_prune.integrations.hf import DSTCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DSTCallback(sparsity=0.9, method="rigl")])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out")            # plain weights: AutoModel.from_pretrained("out") gives the trained model

The callback applies `dst_prune.apply` when the Trainer is built (before a resume loads weights into
the model), takes the Trainer's optimizer when training starts, sets `total_steps` from the Trainer's
`max_steps`, steps the controller once per optimizer step (after gradient accumulation; a step the fp16
loss scaler skipped is not counted), and writes the controller's state as `dst_state.pt` into every
folder the Trainer saves a model to.

How it reaches the Trainer: transformers hands a callback neither the Trainer nor the folder a run
resumes from, and `on_save` runs only after the Trainer has deleted old checkpoints (`save_total_limit`).
So the callback finds the Trainer that dispatches its `on_init_end` (the caller of the event) and:

- wraps that Trainer's `save_model`, which the Trainer calls first when it writes a checkpoint, on every
  rank: the controller's state is computed on every rank (under FSDP2 it gathers the sharded masks, a
  collective) and written by the ranks that save (`args.should_save`), so `dst_state.pt` is in the new
  checkpoint before older ones are rotated away;
- reads the folder a run resumes from where the Trainer holds it, the `resume_from_checkpoint` of its
  own `train()` call as the Trainer resolved it (`True` becomes the last checkpoint), and checks it
  against the folder's `trainer_state.json`;
- with `load_best_model_at_end=True`, restores the best checkpoint's masks and then its weights at
  `on_train_end` (the Trainer loaded its weights under the last masks, which zeroes some of them).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import weakref
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import load_sharded_checkpoint

from dst_prune.errors import DSTError

from .callback_core import SparseTraining

__all__ = ["DSTCallback"]

logger = logging.getLogger(__name__)

STATE_FILE = "dst_state.pt"


def _calling_trainer() -> Trainer | None:
    """The `Trainer` whose method is on the call stack (the one dispatching the current callback event)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _resumed_from(trainer: Trainer) -> str | None:
    """The checkpoint folder `trainer.train()` resumes from, as the Trainer resolved it (innermost frame first)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is trainer and "resume_from_checkpoint" in frame.f_code.co_varnames:
            folder = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(folder, (str, os.PathLike)):
                return os.fspath(folder)
        frame = frame.f_back
    return None


class _SaveModelWithState:
    """`Trainer.save_model` that also writes the controller's state into the folder.

    Runs on every rank that calls `save_model` (the Trainer calls it on all of them): the state is computed
    there, and written where the Trainer writes (`args.should_save`).
    """

    def __init__(self, training: SparseTraining, trainer: Trainer) -> None:
        self.training = training
        self.save_model = trainer.save_model  # the Trainer's own (bound) method
        self.trainer = weakref.ref(trainer)

    def __call__(self, output_dir: str | None = None, *args: object, **kwargs: object) -> None:
        state = self.training.dst.state_dict()  # every rank: a collective under FSDP2
        self.save_model(output_dir, *args, **kwargs)
        trainer = self.trainer()
        if trainer is not None and trainer.args.should_save:
            folder = Path(output_dir if output_dir is not None else trainer.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.training.write(state, folder / STATE_FILE)


def _load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the plain weights the Trainer saved in `folder` (safetensors, `.bin`, or either sharded form)."""
    single = [folder / "model.safetensors", folder / "pytorch_model.bin"]
    if any(path.is_file() for path in single):
        path = next(path for path in single if path.is_file())
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights = load_file(path, device="cpu")
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(weights, strict=False)  # a tied head is left out of save_pretrained's output
    else:
        load_sharded_checkpoint(model, folder, strict=False)


class DSTCallback(TrainerCallback):
    """`transformers.TrainerCallback` that trains the Trainer's model sparse.

    Pass it to `Trainer(callbacks=[...])` (it applies itself while the Trainer is built).

    Args:
        **apply_arguments: `dst_prune.apply`'s keyword arguments (`sparsity` required; `optimizer` and, by
            default, `total_steps` come from the Trainer).

    Attributes:
        dst: the `dst_prune.DynamicSparsity` controller, once the Trainer is built.
    """

    def __init__(self, **apply_arguments: object) -> None:
        self.training = SparseTraining("transformers", apply_arguments)
        self._trainer: weakref.ref | None = None

    @property
    def dst(self):
        return self.training.dst

    def on_init_end(self, args, state, control, model=None, **kwargs):
        trainer = _calling_trainer()
        if trainer is None:
            raise DSTError("DSTCallback.on_init_end was not called by a transformers.Trainer; pass the callback to "
                           "Trainer(..., callbacks=[DSTCallback(...)]).")
        self.training.apply(model)
        if not isinstance(trainer.__dict__.get("save_model"), _SaveModelWithState):
            trainer.save_model = _SaveModelWithState(self.training, trainer)
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        trainer = self._trainer() if self._trainer is not None else None
        if self.dst is None or trainer is None:
            raise DSTError("DSTCallback was added after the Trainer was built, so the model is still dense; pass it "
                           "to Trainer(..., callbacks=[DSTCallback(...)]) instead of trainer.add_callback.")
        if args.load_best_model_at_end and any(t.sharded for t in self.dst.targets):
            raise DSTError("load_best_model_at_end=True with a sharded (FSDP) model: DSTCallback cannot restore the "
                           "best checkpoint's masks with its sharded weights. Train with load_best_model_at_end=False "
                           "and load the best checkpoint afterwards (its dst_state.pt holds its masks).")
        self.training.start(optimizer, state.max_steps)
        if state.global_step > 0:  # resuming: the Trainer restored its state from a checkpoint folder
            folder = _resumed_from(trainer)
            if folder is None:
                raise DSTError(f"the Trainer resumed at step {state.global_step}, but DSTCallback cannot find the "
                               f"checkpoint folder it resumed from; resume with trainer.train("
                               f"resume_from_checkpoint=<folder>).")
            folder = Path(folder)
            self._check_step(folder, state.global_step)
            self.training.load(folder / STATE_FILE, str(folder))

    def on_step_end(self, args, state, control, **kwargs):
        self.training.optimizer_step_done()

    def on_train_end(self, args, state, control, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            # the Trainer has loaded the best checkpoint's weights under the last masks: restore its masks, then
            # its weights under them
            folder = Path(state.best_model_checkpoint)
            self.training.load(folder / STATE_FILE, f"the best checkpoint {folder}")
            _load_weights(self.dst.model, folder)
            logger.info("dst_prune: restored the best checkpoint's masks and weights from %s", folder)

    @staticmethod
    def _check_step(folder: Path, global_step: int) -> None:
        saved = folder / "trainer_state.json"
        if saved.is_file():
            step = json.loads(saved.read_text()).get("global_step")
            if step != global_step:
                raise DSTError(f"{folder} is at step {step}, but the Trainer resumed at step {global_step}; resume "
                               f"with trainer.train(resume_from_checkpoint=<folder>).")
