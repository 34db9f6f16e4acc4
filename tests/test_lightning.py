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
from lightning_module import Classifier, RandomData, TwoOptimizers, loader  # noqa: E402

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
    assert ranks[0]["state_dict_calls"] == 1  # trainer.save_checkpoint asks every rank for the controller's state
    saved = torch.load(tmp_path / "ddp.ckpt", weights_only=True)["callbacks"]["dst_prune.DSTCallback"]
    assert saved["step_count"] == 12 and saved["budget"] == ranks[0]["budget"]


def quiet_trainer(**overrides) -> pl.Trainer:
    return pl.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                         "enable_progress_bar": False, "enable_model_summary": False, **overrides})


def test_lightning_cli_builds_the_callback_from_a_yaml_config_and_trains(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text("""
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 8
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: dst_prune.integrations.lightning.DSTCallback
      init_args:
        sparsity: 0.75
        method: rigl
        update_every: 2
        dense_stem_and_head: false
        hyperparameters:
          drop_fraction: 0.5
""")
    cli = LightningCLI(Classifier, RandomData, args=["fit", "--config", str(config)], save_config_callback=None)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, DSTCallback))
    dst = callback.dst
    assert dst.method == "rigl" and dst.step_count == 8 and dst.update_index == 2 and dst.total_steps == 8
    assert dst.algorithm.drop_fraction == 0.5  # the method's own hyperparameter came through
    assert sum(t.active() for t in dst.targets) == dst.budget == round(0.25 * dst.n_sparse)


def test_hyperparameters_as_a_mapping_or_as_keywords_are_the_same_and_clashes_are_refused():
    by_keyword = DSTCallback(sparsity=0.9, method="rigl", drop_fraction=0.3)
    by_mapping = DSTCallback(sparsity=0.9, method="rigl", hyperparameters={"drop_fraction": 0.3})
    assert by_keyword.training.arguments == by_mapping.training.arguments
    with pytest.raises(dst_prune.DSTError, match="'drop_fraction', which is also given"):
        DSTCallback(sparsity=0.9, method="rigl", hyperparameters={"drop_fraction": 0.3}, drop_fraction=0.2)
    with pytest.raises(dst_prune.DSTError, match="'update_every', which is also given"):
        DSTCallback(sparsity=0.9, hyperparameters={"update_every": 3})
    with pytest.raises(dst_prune.DSTError, match="method='rigl' has no hyperparameter 'threshold'"):
        DSTCallback(sparsity=0.9, method="rigl", hyperparameters={"threshold": 3})


class MasksBeforeStep(pl.Callback):
    """Keeps the masks as they were before the controller's step of each batch (runs before DSTCallback's)."""

    def __init__(self, callback: DSTCallback) -> None:
        self.callback, self.before = callback, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.before = {k: m.clone() for k, m in self.callback.dst.masks().items()}


def test_every_optimizer_holding_sparse_parameters_has_its_state_zeroed_at_changed_positions():
    pl.seed_everything(0)
    callback = DSTCallback(sparsity=0.75, method="set", update_every=2, dense_stem_and_head=False)
    recorder = MasksBeforeStep(callback)
    trainer = quiet_trainer(max_steps=16, callbacks=[recorder, callback])  # 2 optimizer steps per batch: 8 batches
    module = TwoOptimizers()
    trainer.fit(module, loader())
    dst = callback.dst
    assert dst.step_count == 8 and dst.total_steps == 8 and dst.update_index == 4  # the last batch reallocated
    sgd, adam = trainer.optimizers
    assert isinstance(dst.optimizer, tuple) and len(dst.optimizer) == 2
    for target in dst.targets:
        optimizer = sgd if target.name == "net.0.weight" else adam
        state = [v for v in optimizer.state[target.param].values() if v.shape == target.shape]
        changed = recorder.before[target.name] != target.mask
        assert len(state) >= 1 and changed.any(), target.name
        for tensor in state:  # momentum / both Adam moments: zero where pruned or regrown, and outside the mask
            assert not tensor[changed].any() and not tensor[~target.mask].any(), target.name


def test_resume_at_an_epoch_boundary_is_bitwise_exact(tmp_path):
    """16 steps of 8 batches per epoch, stopped at step 8 (an epoch's last batch) and checkpointed there."""

    class Stop(pl.Callback):
        def __init__(self, save_here: bool) -> None:
            self.save_here = save_here

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 8:
                trainer.should_stop = True
                if self.save_here:
                    trainer.save_checkpoint(tmp_path / "step8.ckpt")

    def run(*callbacks, ckpt_path=None, **limits):
        pl.seed_everything(0)
        callback = DSTCallback(sparsity=0.75, method="set", update_every=4, dense_stem_and_head=False)
        trainer = quiet_trainer(callbacks=[callback, *callbacks], **limits)
        module = Classifier()
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
        return module, callback.dst, trainer.optimizers[0], trainer

    # saved inside the loop, or after fit returned (exact with max_epochs; with max_steps Lightning itself resumes
    # such a checkpoint one batch off, dense models too: docs/integrations.md)
    references = {}
    for limits, inside in (({"max_steps": 16}, True), ({"max_epochs": 2}, True), ({"max_epochs": 2}, False)):
        if str(limits) not in references:
            references[str(limits)] = run(**limits)
        reference = references[str(limits)]
        _, _, _, stopped = run(Stop(save_here=inside), **limits)
        if not inside:
            stopped.save_checkpoint(tmp_path / "step8.ckpt")
        resumed = run(ckpt_path=tmp_path / "step8.ckpt", **limits)
        (module, dst, optimizer, _), (module_b, dst_b, optimizer_b, _) = reference, resumed
        assert dst_b.step_count == 16 and dst_b.history == dst.history and dst.update_index == 4
        a, b = module.state_dict(), module_b.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.equal(m, dst_b.masks()[k]) for k, m in dst.masks().items())
        state, state_b = optimizer.state_dict()["state"], optimizer_b.state_dict()["state"]
        assert all(torch.equal(state[k]["momentum_buffer"], state_b[k]["momentum_buffer"]) for k in state)
