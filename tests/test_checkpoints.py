"""The training script's checkpoints (`dst_prune.training.checkpoints`): nothing in them can run code, a
damaged or mixed file is refused by name and changes nothing, and `latest` always names a complete checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import SmallCNN, small_cnn_batch
from timm.utils import ModelEmaV3
from torch import nn

import dst_prune
from dst_prune.training import checkpoints
from dst_prune.training.checkpoints import TrainingProgress, load_checkpoint, save_checkpoint


class Run:
    """A small training run with everything the script checkpoints: model, optimizer, controller, LR schedule,
    training position and an EMA."""

    def __init__(self, seed: int = 0, method: str = "rigl") -> None:
        torch.manual_seed(seed)
        self.accelerator = Accelerator(cpu=True)
        self.model = SmallCNN()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.dst = dst_prune.apply(self.model, sparsity=0.8, method=method, optimizer=self.optimizer, update_every=2,
                                   total_steps=40, seed=1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 0.97 ** step)
        self.progress = TrainingProgress()
        self.ema = ModelEmaV3(self.model, decay=0.9)
        self.dst.add_copy(self.ema.module)

    @property
    def objects(self) -> dict:
        return {"accelerator": self.accelerator, "model": self.model, "optimizer": self.optimizer, "dst": self.dst,
                "scheduler": self.scheduler, "progress": self.progress, "ema": self.ema}

    def train(self, steps: int) -> None:
        for _ in range(steps):
            x, y = small_cnn_batch(n=4 + self.progress.optimizer_steps % 3)
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(x), y).backward()
            self.optimizer.step()
            self.scheduler.step()
            self.dst.step()
            self.ema.update(self.model, step=self.progress.optimizer_steps)
            self.progress.optimizer_steps += 1

    def fingerprint(self) -> dict:
        return {"model": {k: v.clone() for k, v in dst_prune.pruned_state_dict(self.model).items()},
                "ema": {k: v.clone() for k, v in dst_prune.pruned_state_dict(self.ema.module).items()},
                "optimizer": repr(self.optimizer.state_dict()), "dst": repr(self.dst.state_dict()),
                "scheduler": self.scheduler.state_dict(), "progress": self.progress.state_dict(),
                "rng": torch.get_rng_state().clone()}


def same(a: dict, b: dict) -> bool:
    for key in a:
        if isinstance(a[key], dict) and a[key] and isinstance(next(iter(a[key].values())), torch.Tensor):
            if a[key].keys() != b[key].keys() or not all(torch.equal(a[key][k], b[key][k]) for k in a[key]):
                return False
        elif isinstance(a[key], torch.Tensor):
            if not torch.equal(a[key], b[key]):
                return False
        elif a[key] != b[key]:
            return False
    return True


def rewrite_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
                         if p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def saved(tmp_path) -> Path:
    run = Run()
    run.train(5)
    return save_checkpoint(tmp_path / "checkpoints", 5, **run.objects)


def test_a_checkpoint_resumes_exactly(tmp_path):
    straight = Run()
    straight.train(9)
    first = Run()
    first.train(4)
    folder = save_checkpoint(tmp_path, 4, **first.objects)
    resumed = Run(seed=7)  # other weights, other masks
    assert load_checkpoint(folder, **resumed.objects) == 4
    resumed.train(5)
    a, b = straight.fingerprint(), resumed.fingerprint()
    del a["rng"], b["rng"]
    assert same(a, b)
    assert all(not t.orig[~t.mask].any() for t in resumed.dst.targets)
    ema_masks = [resumed.ema.module.get_submodule(t.module_name).weight_mask for t in resumed.dst.targets]
    assert all(torch.equal(m, t.mask) for m, t in zip(ema_masks, resumed.dst.targets))  # the EMA follows


class Payload:
    """Unpickling this runs a shell command that creates a file: what a planted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "dst.pt", "ema.safetensors", "scheduler.json",
                                  "progress.json", "rng-rank0.pt", "manifest.json"])
@pytest.mark.parametrize("manifest_too", [False, True])
def test_a_payload_planted_in_any_file_never_runs(saved, tmp_path, name, manifest_too):
    marker = tmp_path / "payload-ran"
    path = saved / name
    payload = pickle.dumps(Payload(marker))
    if path.suffix == ".pt":
        torch.save(Payload(marker), path)  # a torch file with an object inside
    else:
        path.write_bytes(payload)
    if manifest_too and name != "manifest.json":
        rewrite_manifest(saved)  # an attacker can rewrite the hashes too
    run = Run(seed=3)
    before = run.fingerprint()
    with pytest.raises(dst_prune.DSTError, match=name.replace(".", r"\.") if name != "ema.safetensors" or
                       manifest_too else "ema"):
        load_checkpoint(saved, **run.objects)
    assert not marker.exists()
    assert same(run.fingerprint(), before)


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate dst.pt", r"dst\.pt is missing or differs from the checkpoint's manifest"),
    ("truncate dst.pt, rewrite manifest", r"dst\.pt cannot be read as tensors and plain values"),
    ("flip a mask byte, rewrite manifest", "digest does not match"),
    ("dst.pt of an earlier step, rewrite manifest", "non-zero outside the saved mask"),
    ("dst.pt of a later step, rewrite manifest", r"dst\.pt counted 9 optimizer steps, more than the checkpoint's 5"),
    ("dst.pt of a later step", r"dst\.pt is missing or differs"),
    ("remove optimizer.pt", r"optimizer\.pt is missing"),
    ("remove manifest.json", "manifest.json cannot be read"),
])
def test_damaged_or_mixed_checkpoints_are_refused_by_name_and_change_nothing(saved, tmp_path, damage, message):
    if "truncate" in damage:
        data = (saved / "dst.pt").read_bytes()
        (saved / "dst.pt").write_bytes(data[: len(data) // 2])
    elif "flip" in damage:
        state = torch.load(saved / "dst.pt", weights_only=True)
        state["masks"][0].view(-1)[0] ^= 1
        torch.save(state, saved / "dst.pt")
    elif "step" in damage:
        other = Run()
        other.train(3 if "earlier" in damage else 9)
        torch.save(other.dst.state_dict(), saved / "dst.pt")
    elif "remove" in damage:
        (saved / damage.split()[1]).unlink()
    if "rewrite manifest" in damage:
        rewrite_manifest(saved)
    run = Run(seed=3)
    before = run.fingerprint()
    with pytest.raises(dst_prune.DSTError, match=message):
        load_checkpoint(saved, **run.objects)
    assert same(run.fingerprint(), before)


def test_a_checkpoint_of_another_world_size_or_optimizer_is_refused(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["world_size"] = 2
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(dst_prune.DSTError, match="saved by 2 processes; this run has 1"):
        load_checkpoint(saved, **Run().objects)


def test_latest_always_names_a_complete_checkpoint(tmp_path, monkeypatch):
    """A crash at any point of a save leaves `latest` on a complete checkpoint; saving a step twice never removes
    the folder `latest` names."""
    directory = tmp_path / "checkpoints"
    run = Run()
    run.train(2)
    first = save_checkpoint(directory, 2, **run.objects)
    real_replace = os.replace
    for crash_at in range(3):  # crash at the 1st, 2nd, 3rd rename of the next save
        calls = {"n": 0}

        def crashing_replace(src, dst, calls=calls, crash_at=crash_at):
            if calls["n"] == crash_at:
                raise KeyboardInterrupt("killed during the save")
            calls["n"] += 1
            return real_replace(src, dst)

        monkeypatch.setattr(checkpoints.os, "replace", crashing_replace)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(directory, 2, **run.objects)
        monkeypatch.setattr(checkpoints.os, "replace", real_replace)
        latest = directory / (directory / "latest").read_text()
        assert latest.is_dir() and (latest / "manifest.json").is_file()
        load_checkpoint(latest, **Run(seed=4).objects)  # complete and valid
    again = save_checkpoint(directory, 2, keep=10, **run.objects)  # the same step again: a new name, the old one kept
    assert again != first and again.name.startswith("step-0000002") and first.is_dir()
    assert (directory / "latest").read_text() == again.name
    shutil.rmtree(directory)


def test_keep_retains_the_newest_checkpoints(tmp_path):
    run = Run()
    for step in (1, 2, 3, 4):
        run.train(1)
        save_checkpoint(tmp_path, step, keep=2, **run.objects)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000003", "step-0000004"]


def test_a_pickled_checkpoint_of_version_0_1_is_refused_unread(tmp_path):
    marker = tmp_path / "payload-ran"
    old = tmp_path / "old"
    old.mkdir()
    (old / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    run = Run(seed=3)
    with pytest.raises(dst_prune.DSTError, match=r"checkpoint of dst_prune 0\.1, whose state files are pickles"):
        load_checkpoint(old, **run.objects)
    assert not marker.exists()
