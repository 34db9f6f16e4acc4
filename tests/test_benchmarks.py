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


@pytest.mark.slow
def test_structured_accuracy_benchmark_smoke(datapath, tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "structured_accuracy.py"), "--data", str(datapath),
               "--mnist-epochs", "1", "--mnist-train-images", "3000", "--seeds", "0", "--sparsities", "0.9",
               "--cifar-sparsities", "--update-every", "5", "--workers", "1", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "srigl / rigl" in result.stdout
    runs = json.loads((tmp_path / "structured_accuracy.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"dense", "static", "rigl", "srigl"}
    assert all(r["accuracy"] > 0.2 for r in runs)  # 30 steps: above chance, no more
    assert all(abs(r["measured_sparsity"] - 0.9) < 1e-4 and r["updates"] > 0 for r in runs if r["method"] != "dense"
               and r["method"] != "static")
    assert (tmp_path / "structured_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mnist | 0.9 |" in (tmp_path / "structured_accuracy.md").read_text()


def run_benchmark(script: str, *args: str, tmp_path: Path) -> dict:
    output = tmp_path / f"{script}.json"
    command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x dense" in result.stdout
    return json.loads(output.read_text())


@pytest.mark.slow
def test_step_time_benchmark_smoke(tmp_path):
    report = run_benchmark("step_time", "--models", "resnet18", "--variants", "dense", "dsr", "prune",
                           "--repeats", "2", "--warmup", "1", "--update-repeats", "1", "--batch", "8",
                           "--image-size", "64", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"dense", "dsr", "prune"}
    assert rows["dense"]["ratio_to_dense"] == 1.0 and rows["dsr"]["update_ms"] > 0
    assert "update_ms" not in rows["prune"]


@pytest.mark.slow
def test_reallocation_and_memory_and_inference_benchmarks_smoke(tmp_path):
    realloc = tmp_path / "reallocation.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reallocation.py"), "--sizes", "1",
                             "--methods", "dsr", "rigl", "--peers", "--repeats", "1", "--output", str(realloc)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(realloc.read_text())["results"]
    assert [r["variant"] for r in rows] == ["dsr", "rigl"] and all(r["median_ms"] > 0 for r in rows)
    memory = run_benchmark("memory", "--models", "resnet18", "--variants", "dense", "dsr", "--batch", "8",
                           "--image-size", "64", "--parallel", "2", tmp_path=tmp_path)
    assert all(r["peak_bytes"] > 0 for r in memory["results"])
    inference = run_benchmark("inference", "--models", "mlp_4096x3", "--batches", "1", "--sparsities", "0.9",
                              "--repeats", "2", tmp_path=tmp_path)
    assert {r["format"] for r in inference["results"]} == {"dense", "csr"}
