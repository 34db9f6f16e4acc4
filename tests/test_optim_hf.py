"""dst_prune.optim in the real Hugging Face `Trainer` (`optimizers=(opt, None)` with `DSTCallback`): the same run as
with torch's AdamW, compact state, exact resume from the Trainer's checkpoint, and free_gradients' refusals."""

from __future__ import annotations

import re

import pytest
import torch
from optim_runs import one_thread  # noqa: F401

import dst_prune
import dst_prune.optim

transformers = pytest.importorskip("transformers")
from test_hf import data, gpt2  # noqa: E402  (the same tiny GPT-2 and token data)
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from dst_prune.integrations.hf import DSTCallback  # noqa: E402


class Snapshot(TrainerCallback):
    """The model's weights when training begins (after the callback made it sparse)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = {k: v.clone() for k, v in model.state_dict().items()}


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(output, make_optimizer, *, resume: str | None = None, stop_at: int | None = None,
          callbacks: tuple = (), model=None, **overrides):
    model = gpt2() if model is None else model
    optimizer = make_optimizer(model.parameters())
    callback = DSTCallback(sparsity=0.9, method="rigl", update_every=2)
    args = TrainingArguments(**{"output_dir": str(output), "max_steps": 8, "per_device_train_batch_size": 4,
                                "gradient_accumulation_steps": 2, "save_steps": 4, "report_to": [], "use_cpu": True,
                                "disable_tqdm": True, "logging_steps": 1000, "seed": 0, **overrides})
    trainer = Trainer(model=model, args=args, train_dataset=data(32), optimizers=(optimizer, None),
                      callbacks=[callback, *callbacks, *([StopAt(stop_at)] if stop_at else [])])
    trainer.train(resume_from_checkpoint=resume)
    return model, callback.dst, optimizer


def assert_close_models(a, b, exact=False):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


def test_trainer_with_compact_adamw_equals_torchs_and_resumes_bitwise(tmp_path):
    def ours(p):
        return dst_prune.optim.AdamW(p, lr=1e-3, weight_decay=0.01)

    reference, reference_dst, _ = train(tmp_path / "torch", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01))
    model, dst, optimizer = train(tmp_path / "ours", ours)
    assert dst.update_index == 2 and dst.history == reference_dst.history
    assert_close_models(model, reference)
    for target in dst.targets:
        assert optimizer.state[target.param]["exp_avg"].shape == (target.active(),)
    train(tmp_path / "run", ours, stop_at=4)
    saved = torch.load(tmp_path / "run" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert any("active_indices" in s for s in saved["state"].values())
    resumed, resumed_dst, _ = train(tmp_path / "run", ours, resume=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed_dst.step_count == 8 and resumed_dst.history == dst.history
    assert_close_models(resumed, model, exact=True)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"gradient_accumulation_steps": 1}, "no clipping by the global norm"),  # max_grad_norm=1.0, the default
    ({"gradient_accumulation_steps": 1, "max_grad_norm": 0}, "also the norm a trainer logs"),
    ({"max_grad_norm": 0}, "gradient accumulation"),  # gradient_accumulation_steps=2
])
def test_trainer_loops_read_the_gradients_so_free_gradients_is_refused_at_the_first_step(tmp_path, overrides,
                                                                                         message):
    """transformers' Trainer reads every gradient after backward (to clip, and to log their norm even without
    clipping): free_gradients cannot serve it, and says so before the first step changed anything."""
    snapshot = Snapshot()
    model = gpt2()
    with pytest.raises(dst_prune.DSTError, match=re.escape(message)):
        train(tmp_path, lambda p: dst_prune.optim.AdamW(p, lr=1e-3, free_gradients=True), model=model,
              callbacks=(snapshot,), **overrides)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot.state[key]), key
