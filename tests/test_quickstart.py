"""The README's main job: scripts/quickstart.py, run as a user runs it, on real data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart.py"


def run(*args: str, datapath: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DATAPATH"}
    if datapath:
        env["DATAPATH"] = datapath
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                            timeout=300, cwd=SCRIPT.parents[1] / "tests")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def parse(stdout: str) -> tuple[str, float, float]:
    match = re.search(r"^(.+): test accuracy ([0-9.]+) at sparsity ([0-9.]+)", stdout, re.M)
    assert match, stdout
    return match.group(1), float(match.group(2)), float(match.group(3))


def test_quickstart_on_bundled_digits_needs_no_data():
    stdout = run()
    assert "# nonzero parameters in sparse" in stdout and "Parameter tensor" in stdout
    dataset, accuracy, sparsity = parse(stdout)
    assert dataset == "digits (scikit-learn)"
    assert sparsity == 0.9 and accuracy > 0.9


@pytest.mark.slow
def test_quickstart_on_real_mnist(datapath):
    dataset, accuracy, sparsity = parse(run("--epochs", "2", datapath=str(datapath)))
    assert dataset == "MNIST"
    assert sparsity == 0.9 and accuracy > 0.95
