"""The benchmark scripts run end to end (tiny settings) and write what the README shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mnist_methods_benchmark_smoke(datapath, tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "mnist_methods.py"), "--data", str(datapath), "--epochs",
               "1", "--seeds", "0", "--sparsities", "0.9", "--methods", "static", "rigl", "--workers", "1",
               "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "mnist_methods.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"static", "rigl"}
    assert all(r["accuracy"] > 0.9 and abs(r["measured_sparsity"] - 0.9) < 1e-4 for r in runs)
    assert (tmp_path / "mnist_methods.png").read_bytes()[:4] == b"\x89PNG"
    assert "| rigl |" in (tmp_path / "mnist_methods.md").read_text()
