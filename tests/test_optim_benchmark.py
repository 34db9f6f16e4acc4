"""benchmarks/memory_compact.py end to end in its quick form (tiny models): every variant measured in its own
process, the same weights with compact state as with torch's optimizer, and the published table written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_memory_compact_benchmark_quick(tmp_path):
    output = tmp_path / "memory_compact.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "memory_compact.py"), "--quick", "--models", "resnet50",
               "--variants", "dense", "masked", "compact", "compact_free", "--threads", "1", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x dense" in result.stdout and "x masked" in result.stdout
    report = json.loads(output.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"dense", "masked", "compact", "compact_free"}
    assert all(r["peak_bytes"] > 0 and r["step_ms"] > 0 for r in rows.values())
    assert rows["masked"]["updates"] == rows["compact"]["updates"] == rows["compact_free"]["updates"] > 0
    assert rows["compact"]["state_bytes"] < rows["masked"]["state_bytes"] / 2  # resnet18 at 90%, SGD momentum
    for variant in ("compact", "compact_free"):  # separate processes, same training: the same weights
        assert rows[variant]["max_relative_weight_difference_to_masked"] < 1e-5
    timing = report["timing_at_0.9"]["resnet50"]
    assert set(timing) == {"dense", "masked", "compact", "compact_free"}
    assert output.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    table = output.with_suffix(".md").read_text()
    assert "| resnet50 | compact_free |" in table and "measured on" in table
