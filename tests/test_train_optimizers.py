"""scripts/train.py with dst_prune.optim's compact optimizers: the same run as torch's optimizer, in less memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
COMMON = ["--cpu", "--max-steps", "12", "--update-every", "3", "--method", "rigl", "--batch-size", "16",
          "--lr", "0.01", "--log-every", "4"]


def train(output: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DATAPATH": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *COMMON, "--output-dir", str(output), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_compact_adamw_with_freed_gradients_trains_what_torchs_adamw_does(tmp_path):
    runs = {}
    for name, flags in (("torch", ["--optimizer", "adamw"]),
                        ("compact", ["--optimizer", "compact-adamw", "--free-gradients"])):
        result = train(tmp_path / name, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (safetensors.torch.load_file(tmp_path / name / "model.safetensors"),
                      torch.load(tmp_path / name / "dst_state.pt", weights_only=True))
    (weights, state), (compact_weights, compact_state) = runs["torch"], runs["compact"]
    assert state["masks_digest"] == compact_state["masks_digest"] and state["update_index"] == 2  # (stop at 9)
    for key, value in weights.items():
        assert torch.allclose(value, compact_weights[key], rtol=1e-6, atol=1e-7), key


@pytest.mark.parametrize(("flags", "message"), [
    (["--free-gradients"], "--free-gradients needs a compact-\\* optimizer"),
    (["--optimizer", "compact-sgd", "--free-gradients", "--grad-accum", "2"], "--grad-accum .* cannot run with it"),
    (["--optimizer", "compact-adam", "--free-gradients", "--clip-grad", "1"], "--clip-grad .* cannot run with it"),
    (["--optimizer", "compact-adamw", "--fsdp"], "FSDP2's sharded parameters need torch's optimizers"),
])
def test_optimizer_flags_that_cannot_work_together_are_usage_errors(tmp_path, flags, message):
    result = train(tmp_path / "run", *flags)
    assert result.returncode == 2 and pytest.importorskip("re").search(message, result.stderr), result.stderr[-2000:]
