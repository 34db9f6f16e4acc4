"""dst_prune.optim in the real `lightning.pytorch.Trainer` (`configure_optimizers` returns it, `DSTCallback` makes the
model sparse): the same run as with torch's optimizer, compact state, resume from Lightning's checkpoint, and
free_gradients inside Lightning's closure, refused when Lightning clips gradients."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from optim_runs import one_thread  # noqa: F401

import dst_prune
import dst_prune.optim

pl = pytest.importorskip("lightning.pytorch")
sys.path.insert(0, str(Path(__file__).parent / "workers"))
from lightning_module import Classifier, loader  # noqa: E402

from dst_prune.integrations.lightning import DSTCallback  # noqa: E402

OPTIMIZERS = {
    "torch": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "compact": lambda p: dst_prune.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "free": lambda p: dst_prune.optim.AdamW(p, lr=1e-2, weight_decay=0.05, free_gradients=True),
}


class WithOptimizer(Classifier):
    """The tests' classifier with one of `OPTIMIZERS` (by name, so that its checkpoint loads by class)."""

    def __init__(self, optimizer: str = "compact", width: int = 32) -> None:
        super().__init__(width)
        self.optimizer_name = optimizer

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer_name](self.parameters())


def fit(tmp_path: Path, optimizer: str, *, accumulate: int = 1, clip: float | None = None, max_steps: int = 8,
        ckpt_path: str | None = None, stop_at: int | None = None):
    pl.seed_everything(0)
    module = WithOptimizer(optimizer)
    callback = DSTCallback(sparsity=0.75, method="rigl", update_every=2, dense_stem_and_head=False)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1,
                                               filename="{step}")

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == stop_at:
                trainer.should_stop = True

    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
                         gradient_clip_val=clip, callbacks=[callback, checkpoints, StopAt()],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, callback.dst, trainer


def assert_same_weights(a, b, exact=False):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


def test_compact_optimizer_equals_torchs_with_accumulation_and_resumes_bitwise(tmp_path):
    reference, reference_dst, _ = fit(tmp_path / "torch", "torch", accumulate=2)
    module, dst, trainer = fit(tmp_path / "compact", "compact", accumulate=2)
    assert dst.update_index == 2 and dst.history == reference_dst.history  # (RigL stops at 75% of training)
    assert_same_weights(module, reference)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, dst_prune.optim.AdamW)
    for target in dst.targets:
        assert optimizer.state[target.param]["exp_avg"].shape == (target.active(),)
    fit(tmp_path / "run", "compact", accumulate=2, stop_at=4)
    resumed, resumed_dst, _ = fit(tmp_path / "run", "compact", accumulate=2,
                                  ckpt_path=str(tmp_path / "run" / "step=4.ckpt"))
    assert resumed_dst.history == dst.history
    assert_same_weights(resumed, module, exact=True)


def test_free_gradients_run_inside_lightnings_closure_as_torch(tmp_path):
    reference, _, _ = fit(tmp_path / "torch", "torch")
    module, dst, _ = fit(tmp_path / "free", "free")
    assert dst.update_index == 2
    assert_same_weights(module, reference)


def test_free_gradients_with_lightnings_gradient_clipping_is_refused(tmp_path):
    with pytest.raises(dst_prune.DSTError, match=re.escape("no clipping by the global norm")):
        fit(tmp_path, "free", clip=1.0)
