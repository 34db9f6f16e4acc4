"""timm's `train.py` with dst_prune: the documented patch (`docs/examples/timm_train.patch`) applies to the real
script and runs; a script of our own in train.py's shape runs the patch's lines with timm's real pieces, trains
sparse, checkpoints, resumes exactly, and its checkpoints load into untouched models through timm's loaders."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import load_checkpoint
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler
from torch import nn

import dst_prune
from dst_prune.integrations import timm as dst_timm

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "docs" / "examples" / "timm_train.patch"
MINI = ROOT / "tests" / "workers" / "timm_mini_train.py"
REAL_TRAIN_PY = "DST_PRUNE_TIMM_TRAIN_PY"


def mini_script():
    spec = importlib.util.spec_from_file_location("timm_mini_train", MINI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def added_lines(patch: Path) -> list[str]:
    return [line[1:] for line in patch.read_text().splitlines() if line.startswith("+") and not line.startswith("+++")]


def test_the_patch_adds_fifteen_lines_which_the_mini_script_runs():
    """The docs count the lines; every one of them is, verbatim, a line of the script the next test runs."""
    added = added_lines(PATCH)
    removed = [line for line in PATCH.read_text().splitlines() if line.startswith("-") and not line.startswith("---")]
    assert len(added) == 15 and removed == ["-        saver = utils.CheckpointSaver("]
    script = {line.strip() for line in MINI.read_text().splitlines()}
    assert [line for line in added if line.strip() not in script] == []
    assert "15 lines" in (ROOT / "docs" / "integrations.md").read_text()


def test_mini_script_trains_sparse_checkpoints_and_resumes_exactly(tmp_path):
    script = mini_script()
    sparse = ["--sparse-update-every", "2"]
    straight = script.main(["--output", str(tmp_path / "straight"), *sparse])
    dst = straight["dst"]
    assert dst.step_count == dst.total_steps == 8 and dst.update_index == 2  # at 2 and 4: RigL stops at 0.75 * 8
    assert sum(t.active() for t in dst.targets) == dst.budget and round(dst.sparsity, 2) == 0.9

    resumed = script.main(["--output", str(tmp_path / "resumed"), "--seed", "5", *sparse,
                           "--resume", str(tmp_path / "straight" / "checkpoint-0.pth.tar")])
    assert resumed["dst"].history == dst.history
    for key in ("model", "task"):
        a, b = straight[key].state_dict(), resumed[key].state_dict()  # (the task's holds the EMA's too)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    last = tmp_path / "resumed" / "last.pth.tar"
    assert dst_timm.checkpoint_state(last)["step_count"] == 8

    # timm's loaders read it into untouched models: create_model and load_checkpoint take the EMA by default,
    # validate.py the model's own weights unless --use-ema
    x = torch.randn(2, 3, 32, 32)
    ema = resumed["task"].get_trainable_module(ema=True).module.eval()
    untouched = timm.create_model("test_resnet", num_classes=10, checkpoint_path=str(last)).eval()
    assert not dst_prune.is_sparse(untouched) and torch.equal(untouched(x), ema(x))
    for use_ema, expected in ((False, resumed["model"].eval()), (True, ema)):  # validate.py [--use-ema]
        plain = timm.create_model("test_resnet", num_classes=10).eval()
        load_checkpoint(plain, str(last), use_ema=use_ema, strict=True)
        assert torch.equal(plain(x), expected(x))

    # and dst_timm.resume into a freshly applied model restores the masks
    fresh = timm.create_model("test_resnet", num_classes=10)
    fresh_dst = dst_timm.apply(fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1), sparsity=0.9,
                               method="rigl", update_every=2)
    dst_timm.resume(fresh_dst, last)
    assert all(torch.equal(a, b) for a, b in zip(fresh_dst.masks().values(), dst.masks().values()))


@pytest.mark.slow
def test_the_patch_applies_to_the_real_train_py_and_it_trains_sparse(tmp_path):
    """With DST_PRUNE_TIMM_TRAIN_PY naming timm's train.py (from a clone of pytorch-image-models, 1.0.27 or
    later): `git apply` takes the documented patch, and the patched script trains, checkpoints and resumes."""
    source = os.environ.get(REAL_TRAIN_PY)
    if not source or not Path(source).is_file():
        pytest.skip(f"set {REAL_TRAIN_PY} to timm's train.py (git clone https://github.com/huggingface/"
                    f"pytorch-image-models) to apply the documented patch to the real script")
    if shutil.which("git") is None:
        pytest.skip("git is not installed (the test applies the patch with git apply)")
    shutil.copy(source, tmp_path / "train.py")
    applied = subprocess.run(["git", "apply", "--verbose", str(PATCH)], cwd=tmp_path, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr

    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("validation", 4)):
        for label in range(2):
            folder = tmp_path / "data" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
                image[:, :, label] = 255
                Image.fromarray(image.numpy()).save(folder / f"{i}.png")

    def train(*extra: str) -> None:
        command = [sys.executable, "train.py", "--data-dir", "data", "--model", "test_resnet", "--num-classes", "2",
                   "--device", "cpu", "--epochs", "2", "--batch-size", "4", "-j", "0", "--input-size", "3", "32",
                   "32", "--no-prefetcher", "--output", "out", "--lr", "0.05", "--warmup-epochs", "0",
                   "--model-ema", "--model-ema-decay", "0.9", "--sparse-update-every", "2", *extra]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-4000:]

    train("--experiment", "run")
    run = tmp_path / "out" / "run"
    state = dst_timm.checkpoint_state(run / "last.pth.tar")
    assert state["step_count"] == state["total_steps"] == 12 and state["update_index"] == 4  # 24 images, batch 4
    assert dst_timm.checkpoint_state(run / "checkpoint-0.pth.tar")["step_count"] == 6
    train("--experiment", "resumed", "--resume", str(run / "checkpoint-0.pth.tar"))
    resumed = dst_timm.checkpoint_state(tmp_path / "out" / "resumed" / "last.pth.tar")
    assert resumed["step_count"] == 12 and resumed["history"][:3] == state["history"][:3]
    untouched = timm.create_model("test_resnet", num_classes=2, checkpoint_path=str(run / "last.pth.tar"))
    assert not dst_prune.is_sparse(untouched)
    convs = [m.weight for m in untouched.modules() if isinstance(m, nn.Conv2d)][1:]  # (the stem stays dense)
    assert 0.85 < float(sum((w == 0).sum() for w in convs) / sum(w.numel() for w in convs)) < 0.95


def build(seed: int = 0, **arguments):
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=10)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9)
    return model, optimizer, dst_timm.apply(model, optimizer=optimizer, sparsity=0.9, method="rigl", update_every=1,
                                            **arguments)


def train(model, optimizer, dst, steps: int) -> None:
    for _ in range(steps):
        nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
        optimizer.step()
        optimizer.zero_grad()
        dst_timm.step(dst)


def test_ordering_mistakes_are_clear_errors(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10)
    early_ema = ModelEmaV3(model)  # created before apply: a dense copy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = dst_timm.apply(model, optimizer=optimizer, sparsity=0.9, method="rigl")
    with pytest.raises(dst_prune.DSTError, match=r"set up the EMA \(task.setup_ema, ModelEmaV3\(model\)\) after"):
        dst_timm.track_ema(dst, early_ema)
    task = ClassificationTask(model, criterion=nn.CrossEntropyLoss(), verbose=False)
    with pytest.raises(dst_prune.DSTError, match=r"after task.setup_ema"):
        dst_timm.track_ema(dst, task)
    with pytest.raises(dst_prune.DSTError, match=r"call dst.set_total_steps\(num_epochs \* updates_per_epoch\)"):
        dst_timm.step(dst)
    assert dst.step_count == 0
    with pytest.raises(dst_prune.DSTError, match="pass dst=dst in the call of train_one_epoch"):
        dst_timm.step(None)
    with pytest.raises(dst_prune.DSTError, match="give both"):
        dst_timm.apply(timm.create_model("test_resnet"), optimizer=optimizer, epochs=3, sparsity=0.9)
    dense = timm.create_model("test_resnet", num_classes=10)
    saver = CheckpointSaver(dense, torch.optim.SGD(dense.parameters(), lr=0.1), checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=0.0)
    with pytest.raises(dst_prune.DSTError, match="holds no dst_prune state: it was saved without "
                                                   "SparseCheckpointSaver"):
        dst_timm.resume(dst, tmp_path / "last.pth.tar")


def test_resume_refuses_a_mixed_checkpoint_before_changing_anything(tmp_path):
    model, optimizer, dst = build(total_steps=8)
    saver = dst_timm.SparseCheckpointSaver(dst, model=model, optimizer=optimizer, checkpoint_dir=str(tmp_path),
                                           recovery_dir=str(tmp_path), args=argparse.Namespace(model="test_resnet"))
    train(model, optimizer, dst, 1)
    saver.save_checkpoint(0, metric=0.0)
    train(model, optimizer, dst, 2)
    saver.save_checkpoint(1, metric=1.0)
    with torch.serialization.safe_globals([argparse.Namespace]):  # (timm stores its args)
        early, late = (torch.load(tmp_path / f"checkpoint-{i}.pth.tar", weights_only=True) for i in (0, 1))
    assert early["dst_prune"]["step_count"] == 1 and late["dst_prune"]["step_count"] == 3
    late["dst_prune"] = early["dst_prune"]  # the late weights with the early masks
    torch.save(late, tmp_path / "mixed.pth.tar")

    target, _, target_dst = build(seed=4, total_steps=8)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(dst_prune.DSTError, match=r"mixed\.pth\.tar, state_dict: .*non-zero outside the saved mask"):
        dst_timm.resume(target_dst, tmp_path / "mixed.pth.tar")
    assert target_dst.step_count == 0
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    dst_timm.resume(target_dst, tmp_path / "checkpoint-1.pth.tar")
    assert target_dst.step_count == 3


def test_a_step_the_loss_scaler_skipped_is_not_counted(caplog):
    model, optimizer, dst = build(total_steps=8)
    scaler = NativeScaler(device="cpu")  # train.py's loss scaler (fp16): it skips steps whose gradients overflow
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    scaler(nn.functional.cross_entropy(model(x), y), optimizer)
    assert dst_timm.step(dst) and dst.step_count == 1  # (update_every=1: it reallocated)
    before = {name: mask.clone() for name, mask in dst.masks().items()}
    scaler(nn.functional.cross_entropy(model(x), y) * float("inf"), optimizer)
    assert not dst_timm.step(dst) and dst.step_count == 1
    assert "did not step since the last update" in caplog.text
    assert all(torch.equal(before[name], mask) for name, mask in dst.masks().items())


def test_a_checkpoint_of_an_earlier_saver_layout_still_resumes(tmp_path):
    model, optimizer, dst = build(total_steps=8)
    train(model, optimizer, dst, 2)
    torch.save({"state_dict": model.state_dict(), "saver": {"dst_prune": dst.state_dict()}}, tmp_path / "old.pth")
    _, _, other = build(seed=3, total_steps=8)
    dst_timm.resume(other, tmp_path / "old.pth")
    assert other.step_count == 2 and all(torch.equal(a, b) for a, b in zip(other.masks().values(),
                                                                          dst.masks().values()))
