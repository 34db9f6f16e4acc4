"""The Lightning integration with the real `lightning.pytorch.Trainer` on CPU: exact budget, checkpoints that
`load_from_checkpoint` loads into an untouched module, bitwise resume, and 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dst_prune

pl = pytest.importorskip("lightning.pytorch")
sys.path.insert(0, str(Path(__file__).parent / "workers"))
from lightning_module import Classifier, loader  # noqa: E402

from dst_prune.integrations.lightning import DSTCallback  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "lightning_module.py"


class StopAt(pl.Callback):
    """An interruption: training stops after optimizer step `step` (and its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def fit(tmp_path: Path, max_steps: int, callback, ckpt_path: str | None = None, module=None, stop_at=None):
    pl.seed_everything(0)
    module = module or Classifier()
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1,
                                               filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, logger=False,
                         callbacks=[callback, checkpoints, *([StopAt(stop_at)] if stop_at else [])],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, trainer


def rigl() -> DSTCallback:
    return DSTCallback(sparsity=0.75, method="rigl", update_every=2, dense_stem_and_head=False)


@pytest.mark.slow
def test_fit_is_exact_loads_into_an_untouched_module_and_resumes_bitwise(tmp_path):
    callback = rigl()
    module, trainer = fit(tmp_path / "straight", 8, callback)
    dst = callback.dst
    assert dst.step_count == 8 and dst.total_steps == trainer.estimated_stepping_batches == 8
    assert dst.update_index == 2 and sum(t.active() for t in dst.targets) == dst.budget == round(0.25 * dst.n_sparse)
    untouched = Classifier.load_from_checkpoint(tmp_path / "straight" / "step=8.ckpt").eval()
    assert not dst_prune.is_sparse(untouched)
    x = torch.randn(5, 16)
    assert torch.equal(untouched(x), module.eval()(x))

    fit(tmp_path / "run", 8, rigl(), stop_at=4)  # an interrupted run: 4 of 8 steps
    resumed_callback = rigl()
    resumed, _ = fit(tmp_path / "run", 8, resumed_callback, ckpt_path=str(tmp_path / "run" / "step=4.ckpt"))
    assert resumed_callback.dst.history == dst.history
    a, b = module.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(m, n) for m, n in zip(dst.masks().values(), resumed_callback.dst.masks().values()))

    fit(tmp_path / "dense", 8, pl.Callback(), stop_at=4)  # a run without dst_prune cannot be resumed sparse
    with pytest.raises(dst_prune.DSTError, match="holds no dst_prune state"):
        fit(tmp_path / "dense", 8, rigl(), ckpt_path=str(tmp_path / "dense" / "step=4.ckpt"))


@pytest.mark.slow
def test_two_process_ddp_keeps_masks_in_sync(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    assert ranks[0]["in_sync"] and ranks[0]["updates"] > 0 and ranks[0]["active"] == ranks[0]["budget"]
