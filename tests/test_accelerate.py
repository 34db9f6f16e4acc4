"""accelerate's `save_state`/`load_state` with the controller (`dst_prune.integrations.accelerate.register`) and the
length of training per process (`total_steps`): a resumed 2-process run ends bitwise equal to an uninterrupted one,
and a damaged or planted checkpoint folder is refused before anything is loaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dst_prune
from dst_prune.integrations import accelerate as dst_accelerate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "docs" / "examples" / "accelerate_train.py"


@pytest.fixture
def accelerators():
    """Fresh `Accelerator(cpu=True)` objects (each keeps its own prepared objects); accelerate's shared state is
    reset afterwards."""
    yield lambda: Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


class Run:
    """A tiny MLP trained with RigL through accelerate, the controller registered."""

    def __init__(self, accelerator: Accelerator, seed: int = 0, register: bool = True) -> None:
        self.accelerator = accelerator
        torch.manual_seed(seed)
        data = torch.Generator().manual_seed(7)
        x = torch.randn(32, 8, generator=data)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=4)
        self.dst = dst_prune.apply(model, sparsity=0.8, method="rigl", optimizer=optimizer, update_every=2,
                                   total_steps=dst_accelerate.total_steps(accelerator, loader, 2),
                                   dense_stem_and_head=False)
        self.dst.prepare_for_ddp()
        self.model, self.optimizer, self.loader = accelerator.prepare(model, optimizer, loader)
        if register:
            dst_accelerate.register(accelerator, self.dst)

    def train(self, steps: int) -> None:
        for _, (x, y) in zip(range(steps), self.loader):
            self.accelerator.backward(nn.functional.cross_entropy(self.model(x), y))
            self.optimizer.step()
            self.dst.step()
            self.optimizer.zero_grad()

    def everything(self) -> tuple:
        """What a refused load must leave as it was: model (and hooks), optimizer state, controller state."""
        state = self.optimizer.state_dict()["state"]
        optimizer = {index: {k: v.clone() for k, v in values.items()} for index, values in state.items()}
        return snapshot(self.model), optimizer, self.dst.state_dict()

    def assert_unchanged(self, before: tuple) -> None:
        model, optimizer, controller = before
        assert_unchanged(self.model, model)
        now = self.optimizer.state_dict()["state"]
        assert all(torch.equal(now[i][k], v) for i, s in optimizer.items() for k, v in s.items())
        state = self.dst.state_dict()
        assert (state["masks_digest"], state["step_count"], state["update_index"]) == \
            (controller["masks_digest"], controller["step_count"], controller["update_index"])


class Payload:
    """A pickle that creates `marker` when it is unpickled (a stand-in for a malicious checkpoint file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class Counter:
    """Another object a user registers with accelerator.register_for_checkpointing."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def launch(*args: str) -> subprocess.CompletedProcess:
    """The docs' recipe (accelerate's complete_cv_example.py, sparse) on 2 processes: DDP over gloo on the CPU."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE), "--cpu",
               "--checkpointing_steps", "3", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)


@pytest.mark.slow
def test_recipe_on_two_processes_resumed_from_save_state_is_bitwise_equal(tmp_path):
    """The run resumed by a second launch from the step-9 folder (mid-epoch) ends with the same weights, masks,
    optimizer state and controller as the uninterrupted run; a folder without the controller stops both processes
    with the DSTError (none hangs)."""
    straight = launch("--output_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-4000:]
    resumed = launch("--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                     str(tmp_path / "straight" / "step_9"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed from checkpoint" in resumed.stdout
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["step_12", "step_15", "step_18"]
    assert sorted(p.name for p in (tmp_path / "straight" / "step_9").iterdir()) == [
        "dst_state.pt", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
        "scheduler.bin"]  # the controller beside accelerate's files, no custom_checkpoint pickle

    a, b = (tmp_path / run / "step_18" for run in ("straight", "resumed"))
    weights_a, weights_b = safetensors.torch.load_file(a / "model.safetensors"), \
        safetensors.torch.load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    optimizer_a, optimizer_b = (torch.load(f / "optimizer.bin", weights_only=True)["state"] for f in (a, b))
    assert all(torch.equal(optimizer_a[i][k], optimizer_b[i][k]) for i in optimizer_a for k in optimizer_a[i]
               if isinstance(optimizer_a[i][k], torch.Tensor))
    state_a, state_b = (torch.load(f / "dst_state.pt", weights_only=True) for f in (a, b))
    assert all(torch.equal(x, y) for x, y in zip(state_a["masks"], state_b["masks"]))
    assert state_a["history"] == state_b["history"] and state_a["update_index"] == state_b["update_index"] > 3
    # 48 images in batches of 4: 12 batches before prepare, 6 per process: 3 epochs are 18 steps per process
    assert state_a["step_count"] == state_b["step_count"] == state_a["total_steps"] == 18

    damaged = tmp_path / "damaged" / "step_9"
    shutil.copytree(tmp_path / "straight" / "step_9", damaged)
    (damaged / "dst_state.pt").unlink()
    refused = launch("--output_dir", str(tmp_path / "refused"), "--resume_from_checkpoint", str(damaged))
    assert refused.returncode != 0
    assert f"DSTError: {damaged} has no dst_state.pt" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_save_state_writes_the_controller_and_load_state_restores_it(tmp_path, accelerators):
    run = Run(accelerators())
    run.train(6)
    run.accelerator.save_state(str(tmp_path / "ckpt"))
    saved = torch.load(tmp_path / "ckpt" / "dst_state.pt", weights_only=True)
    assert saved["step_count"] == 6 and saved["update_index"] == 3
    assert not list((tmp_path / "ckpt").glob("custom_checkpoint_*"))
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}

    other = Run(accelerators(), seed=3)  # other initial weights and masks
    assert other.dst.state_dict()["masks_digest"] != saved["masks_digest"]
    other.accelerator.load_state(str(tmp_path / "ckpt"))
    assert other.dst.step_count == 6 and other.dst.state_dict()["masks_digest"] == saved["masks_digest"]
    assert all(torch.equal(weights[k], v) for k, v in other.model.state_dict().items())
    run.train(4)
    other.train(4)
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), other.model.state_dict().values()))


def test_a_planted_pickle_payload_never_runs(tmp_path, accelerators):
    """Every file of the folder, replaced by a pickle that runs code when unpickled, is refused by name before
    anything is loaded; accelerate alone unpickles a registered object's file with weights_only=False."""
    run = Run(accelerators())
    counter = Counter()
    run.accelerator.register_for_checkpointing(counter)
    run.train(4)
    run.accelerator.save_state(str(tmp_path / "ckpt"))
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["custom_checkpoint_0.pkl", "dst_state.pt", "model.safetensors", "optimizer.bin",
                     "random_states_0.pkl"]
    run.train(2)
    for name in names:
        folder = tmp_path / f"planted-{name}"
        shutil.copytree(tmp_path / "ckpt", folder)
        marker = tmp_path / f"ran-{name}"
        torch.save(Payload(marker), folder / name)
        before = run.everything()
        with pytest.raises(dst_prune.DSTError, match=str(folder / name)):
            run.accelerator.load_state(str(folder))
        assert not marker.exists(), name
        run.assert_unchanged(before)

    # the negative control: without register(), accelerate unpickles the registered object's file and runs it
    plain = Run(accelerators(), register=False)
    plain.accelerator.register_for_checkpointing(Counter())
    marker = tmp_path / "ran-custom_checkpoint_0.pkl"
    with pytest.raises(TypeError):  # (the unpickled file object is no state dict; the payload already ran)
        plain.accelerator.load_state(str(tmp_path / "planted-custom_checkpoint_0.pkl"))
    assert marker.exists()


def test_a_folder_without_the_controller_or_of_another_step_is_refused(tmp_path, accelerators):
    run = Run(accelerators())
    run.train(2)
    run.accelerator.save_state(str(tmp_path / "early"))
    run.train(6)
    run.accelerator.save_state(str(tmp_path / "late"))
    before = run.everything()

    dense = tmp_path / "dense"
    shutil.copytree(tmp_path / "late", dense)
    (dense / "dst_state.pt").unlink()
    with pytest.raises(dst_prune.DSTError, match=f"{dense} has no dst_state.pt"):
        run.accelerator.load_state(str(dense))
    run.assert_unchanged(before)

    mixed = tmp_path / "mixed"  # the late weights with the early controller: other masks
    shutil.copytree(tmp_path / "late", mixed)
    shutil.copy(tmp_path / "early" / "dst_state.pt", mixed / "dst_state.pt")
    with pytest.raises(dst_prune.DSTError, match=r"model\.safetensors and .*dst_state\.pt do not belong together"):
        run.accelerator.load_state(str(mixed))
    run.assert_unchanged(before)

    flipped = tmp_path / "flipped"  # a valid file whose masks do not match their digest
    shutil.copytree(tmp_path / "late", flipped)
    state = torch.load(flipped / "dst_state.pt", weights_only=True)
    state["masks"][0][0] ^= 1
    torch.save(state, flipped / "dst_state.pt")
    with pytest.raises(dst_prune.DSTError, match=r"flipped/dst_state\.pt: .*digest does not match"):
        run.accelerator.load_state(str(flipped))
    run.assert_unchanged(before)


def test_register_refuses_a_pickled_duplicate_and_a_second_call(tmp_path, accelerators):
    run = Run(accelerators(), register=False)
    run.accelerator.register_for_checkpointing(run.dst)
    with pytest.raises(dst_prune.DSTError, match="register_for_checkpointing"):
        dst_accelerate.register(run.accelerator, run.dst)
    run = Run(accelerators(), register=False)
    registration = dst_accelerate.register(run.accelerator, run.dst)
    with pytest.raises(dst_prune.DSTError, match="already registered"):
        dst_accelerate.register(run.accelerator, run.dst)
    registration.remove()
    run.accelerator.save_state(str(tmp_path / "unregistered"))
    assert not (tmp_path / "unregistered" / "dst_state.pt").exists()
    dst_accelerate.register(run.accelerator, run.dst)


def test_total_steps_counts_each_process_optimizer_steps(accelerators):
    accelerator = accelerators()
    loader = DataLoader(TensorDataset(torch.zeros(40, 1)), batch_size=4)  # 10 batches
    assert dst_accelerate.total_steps(accelerator, loader, 3) == 30
    assert dst_accelerate.total_steps(accelerator, 10, 3) == 30
    assert dst_accelerate.total_steps(accelerator, loader, 3, grad_accum=4) == 9  # 3 per epoch: 4 + 4 + 2
    prepared = accelerator.prepare(loader)
    assert dst_accelerate.total_steps(accelerator, prepared, 3) == 30
    for bad in ({"epochs": 0}, {"epochs": 2.5}, {"grad_accum": 0}):
        arguments = {"epochs": 3, **bad}
        with pytest.raises(dst_prune.DSTError, match=next(iter(bad))):
            dst_accelerate.total_steps(accelerator, loader, **arguments)
    with pytest.raises(dst_prune.DSTError, match="loader_or_len must be"):
        dst_accelerate.total_steps(accelerator, "10", 3)
