"""Resuming `scripts/train.py`: exact with gradient accumulation across epoch ends, flags that define the run are
refused when they change, the others take their new values for real and are logged, and `--resume latest` with
nothing to resume stops. Real processes, real checkpoints on disk, bundled data."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_script import ROOT, SCRIPT, assert_same, checkpoint_state, ranks

sys.path.insert(0, str(ROOT / "scripts"))
import train

# 10 batches per epoch, 3 micro-batches per optimizer step: epochs end inside accumulation cycles (after micro-batches
# 10 and 20); 10 optimizer steps in all, a checkpoint per epoch
ACCUMULATING = ["--cpu", "--train-subset", "160", "--val-subset", "64", "--batch-size", "16", "--grad-accum", "3",
                "--epochs", "3", "--update-every", "2", "--method", "set", "--keep-checkpoints", "10", "--log-every",
                "1", "--ema", "0.9"]


@pytest.fixture(autouse=True, scope="module")
def _temporary_files_under_pytest(tmp_path_factory):
    """The processes these tests start keep their temporary files (torchrun's logs) in pytest's folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield


def run(output: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPT), *ACCUMULATING, "--output-dir", str(output), *extra],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    output = tmp_path_factory.mktemp("accumulating") / "straight"
    run(output)
    return output


def first_checkpoint(output: Path) -> Path:
    return sorted(p for p in (output / "checkpoints").glob("step-*") if p.is_dir())[0]


def test_an_epoch_ending_inside_an_accumulation_cycle_resumes_bitwise(straight, tmp_path):
    first = first_checkpoint(straight)
    resumed = tmp_path / "resumed"
    run(resumed, "--resume", str(first))
    final = "step-0000010"
    assert_same(checkpoint_state(straight / "checkpoints" / final), checkpoint_state(resumed / "checkpoints" / final))
    assert ranks(straight) == ranks(resumed)
    progress = json.loads((first / "progress.json").read_text())
    # the first epoch ended after micro-batch 10, inside a cycle: the checkpoint waited for the cycle's step
    assert progress["micro_batches"] % 3 == 0 and progress["epoch"] == 1 and progress["batch"] > 0


def test_changed_flags_take_their_new_values_and_are_logged(straight, tmp_path):
    first = first_checkpoint(straight)
    step = json.loads((first / "progress.json").read_text())["optimizer_steps"]
    resumed = tmp_path / "changed"
    result = run(resumed, "--resume", str(first), "--lr", "0.0001", "--update-every", "5", "--epochs", "4",
                 "--lr-schedule", "constant", "--momentum", "0.5")
    for change in ("--lr: 0.1 -> 0.0001", "--update-every: 2 -> 5", "--epochs: 3.0 -> 4.0",
                   '--lr-schedule: "cosine" -> "constant"', "--momentum: 0.9 -> 0.5"):
        assert change in result.stderr, change
    with (resumed / "train.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) > step]
    assert rows and all(float(r["lr"]) == 0.0001 for r in rows)  # the new base LR, constant
    state = torch.load(resumed / "dst_state.pt", weights_only=True)
    assert state["schedule"]["update_every"] == 5 and state["total_steps"] == 13  # 4 epochs of 10/3 steps
    assert [r["step"] for r in state["history"] if r["step"] > step] == [5, 10]
    optimizer = torch.load(resumed / "checkpoints" / "step-0000013" / "optimizer.pt", weights_only=True)
    assert {g["momentum"] for g in optimizer["param_groups"]} == {0.5}
    assert json.loads((resumed / "checkpoints" / "step-0000013" / "args.json").read_text())["lr"] == 0.0001


def test_flags_that_define_the_run_are_refused_and_change_nothing(straight, capsys):
    before = files_of(straight)
    argv = [*ACCUMULATING, "--output-dir", str(straight), "--resume", "latest", "--batch-size", "8", "--seed", "1",
            "--lr", "0.5"]
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    message = str(exit_.value.code)
    assert "--batch-size (the checkpoint has 16, this run 8)" in message
    assert "--seed (the checkpoint has 0, this run 1)" in message and "--lr" not in message
    assert files_of(straight) == before


def test_resume_latest_with_nothing_to_resume_stops(tmp_path):
    with pytest.raises(SystemExit, match=r"holds no checkpoint .* nothing to resume"):
        train.main(["--cpu", "--output-dir", str(tmp_path / "new"), "--resume", "latest"])
    assert not (tmp_path / "new").exists()
