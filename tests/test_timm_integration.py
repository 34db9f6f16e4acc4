"""timm's training pieces with dst_prune: the `train.py` patch's helpers (`dst_prune.integrations.timm`),
`ModelEmaV3` on the masks, checkpoints that timm's own loaders read into an untouched model, exact resume."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3
from torch import nn

import dst_prune
from dst_prune.integrations import timm as dst_timm

EPOCHS, UPDATES = 2, 4


def batches(epoch: int):
    g = torch.Generator().manual_seed(epoch)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(UPDATES)]


class Script:
    """The parts of timm's train.py, in its order, with the dst_prune lines of the documented patch."""

    def __init__(self, folder, seed: int = 0, resume: str = "") -> None:
        folder.mkdir(exist_ok=True)
        torch.manual_seed(seed)
        self.model = timm.create_model("test_resnet", num_classes=10, pretrained=False)
        self.optimizer = create_optimizer_v2(self.model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
        self.dst = dst_timm.apply(self.model, optimizer=self.optimizer, epochs=EPOCHS, updates_per_epoch=UPDATES,
                                  sparsity=0.9, method="rigl", update_every=2)
        self.start_epoch = resume_checkpoint(self.model, resume, optimizer=self.optimizer) if resume else 0
        dst_timm.resume(self.dst, resume)
        self.model_ema = ModelEmaV3(self.model, decay=0.9)
        if resume:
            load_checkpoint(self.model_ema.module, resume, use_ema=True)
        dst_timm.track_ema(self.dst, self.model_ema)
        self.saver = dst_timm.SparseCheckpointSaver(
            self.dst, model=self.model, optimizer=self.optimizer, args=argparse.Namespace(model="test_resnet"),
            model_ema=self.model_ema, checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=5)

    def train(self, epochs: range) -> None:
        for epoch in epochs:
            for step, (x, y) in enumerate(batches(epoch)):
                loss = nn.functional.cross_entropy(self.model(x), y)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.dst.step()
                self.model_ema.update(self.model, step=epoch * UPDATES + step)
                for target in self.dst.targets:  # the EMA is zero outside the masks after every update
                    ema = self.model_ema.module.get_submodule(target.module_name)
                    assert not ema.weight_orig[~target.mask].any()
            self.saver.save_checkpoint(epoch, metric=float(-epoch))


@pytest.mark.slow
def test_timm_script_patch_trains_checkpoints_and_resumes_exactly(tmp_path):
    straight = Script(tmp_path / "straight")
    straight.train(range(EPOCHS))
    assert straight.dst.step_count == EPOCHS * UPDATES and straight.dst.update_index > 0
    assert sum(t.active() for t in straight.dst.targets) == straight.dst.budget

    first = Script(tmp_path / "run")
    first.train(range(1))
    resumed = Script(tmp_path / "run", seed=5, resume=str(tmp_path / "run" / "last.pth.tar"))
    assert resumed.start_epoch == 1
    resumed.train(range(resumed.start_epoch, EPOCHS))
    for a, b in ((straight.model, resumed.model), (straight.model_ema.module, resumed.model_ema.module)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert straight.dst.history == resumed.dst.history

    # timm's own loaders read the checkpoint into an untouched model (validate.py's path: the EMA by default)
    x = torch.randn(2, 3, 32, 32)
    untouched = timm.create_model("test_resnet", num_classes=10, checkpoint_path=str(tmp_path / "run" / "last.pth.tar"))
    assert not dst_prune.is_sparse(untouched)
    assert torch.equal(untouched.eval()(x), resumed.model_ema.module.eval()(x))
    plain = timm.create_model("test_resnet", num_classes=10)
    load_checkpoint(plain, str(tmp_path / "run" / "last.pth.tar"), use_ema=False, strict=True)
    assert torch.equal(plain.eval()(x), resumed.model.eval()(x))


def test_ordering_mistakes_are_clear_errors(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10)
    early_ema = ModelEmaV3(model)  # created before apply: a dense copy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = dst_timm.apply(model, optimizer=optimizer, epochs=1, updates_per_epoch=10, sparsity=0.9)
    with pytest.raises(dst_prune.DSTError, match=r"create ModelEmaV3\(model\) after dst_timm.apply"):
        dst_timm.track_ema(dst, early_ema)
    dense = timm.create_model("test_resnet", num_classes=10)
    saver = CheckpointSaver(dense, torch.optim.SGD(dense.parameters(), lr=0.1), checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=0.0)
    with pytest.raises(dst_prune.DSTError, match="holds no dst_prune state: it was saved without "
                                                   "SparseCheckpointSaver"):
        dst_timm.resume(dst, tmp_path / "last.pth.tar")
