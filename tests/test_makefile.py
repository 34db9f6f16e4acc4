"""The Makefile's knobs, as `make -n` prints the commands: TORCH_INDEX for the CPU build of torch, ARGS for
scripts/train.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(*arguments: str) -> list[str]:
    """The commands `make -n` would run (the install recipe included: `-W pyproject.toml` makes it look due).

    Run under `make test`, the child make would inherit MAKEFLAGS/MAKELEVEL and print "Entering directory" lines:
    the environment is cleaned and `--no-print-directory` given so only the commands come back."""
    env = {key: value for key, value in os.environ.items() if key not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS"}}
    result = subprocess.run(["make", "--no-print-directory", "-n", "-W", "pyproject.toml", *arguments], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.splitlines()


def test_args_reach_train_py_and_resume_replaces_overwrite():
    assert dry_run("run")[-1].endswith("scripts/train.py --overwrite ")
    assert dry_run("run", "ARGS=--resume latest")[-1].endswith("scripts/train.py  --resume latest")
    mnist = dry_run("run-mnist", "ARGS=--overwrite --epochs 1")[-1]
    assert mnist.endswith("scripts/train.py --dataset mnist --epochs 5 --batch-size 100 --overwrite --epochs 1")


def test_torch_index_installs_torch_first_and_the_project_with_progress():
    lines = dry_run("install", "TORCH_INDEX=cpu")
    torch_line = next(i for i, line in enumerate(lines) if "--index-url" in line)
    project_line = next(i for i, line in enumerate(lines) if '-e ".[dev]"' in line)
    assert lines[torch_line].endswith("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu")
    assert torch_line < project_line and "--quiet" not in lines[project_line]
    assert 'PYTHONWARNINGS="ignore:Editable installation"' in lines[project_line]
    custom = dry_run("install", "TORCH_INDEX=https://example.org/whl/cu126")
    assert any(line.endswith("--index-url https://example.org/whl/cu126") for line in custom)
    default = dry_run("install")
    assert not any("--index-url" in line for line in default)
    hint = next(i for i, line in enumerate(default) if "TORCH_INDEX=cpu make" in line)
    assert hint < next(i for i, line in enumerate(default) if '-e ".[dev]"' in line)  # said before the big install
