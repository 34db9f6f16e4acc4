"""`scripts/train.py` as a process: its CPU threads and the command it prints to resume a stopped run."""

from __future__ import annotations

import shlex
import sys

import pytest
import torch
from test_train_script import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from train_runtime import SMALL_MODEL, choose_threads, resume_command

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_small_models_get_one_cpu_thread_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(None, CPU, 50_610) == 1  # LeNet-300-100 on the digits: `make run`
    assert choose_threads(None, CPU, SMALL_MODEL) is None  # torch's choice for larger models
    assert choose_threads(None, GPU, 50_610) is None
    assert choose_threads(3, CPU, 50_610) == 3  # --threads
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's (or the launcher's) setting stands
    assert choose_threads(None, CPU, 50_610) is None


@pytest.mark.parametrize(("argv", "expected"), [
    (["--epochs", "5"], ["--epochs", "5", "--resume", "latest"]),
    (["--overwrite", "--lr", "0.1"], ["--lr", "0.1", "--resume", "latest"]),
    (["--resume", "runs/x/checkpoints/step-0000007", "--lr", "0.1"], ["--lr", "0.1", "--resume", "latest"]),
    (["--resume=latest", "--output-dir", "my run"], ["--output-dir", "my run", "--resume", "latest"]),
])
def test_the_resume_command_is_the_run_as_started_with_resume_latest(monkeypatch, argv, expected):
    monkeypatch.setattr(sys, "orig_argv", [".venv/bin/python", "-u", "scripts/train.py", *argv])
    assert shlex.split(resume_command(argv, 1, "scripts/train.py")) == [".venv/bin/python", "-u", "scripts/train.py",
                                                                         *expected]
    launched = shlex.split(resume_command(argv, 2, "scripts/train.py"))
    assert launched == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "scripts/train.py", *expected]
