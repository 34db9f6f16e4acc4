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
def test_step_time_benchmark_smoke_on_a_timm_convnet(tmp_path):
    report = run_benchmark("step_time", "--models", "test_resnet", "--variants", "dense", "dsr", "prune",
                           "--repeats", "2", "--warmup", "1", "--update-repeats", "1", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"dense", "dsr", "prune"}
    assert rows["dense"]["ratio_to_dense"] == 1.0 and rows["dsr"]["update_ms"] > 0
    assert "update_ms" not in rows["prune"]


@pytest.mark.slow
def test_memory_benchmark_measures_two_variants_at_a_time(tmp_path):
    memory = run_benchmark("memory", "--models", "lenet_300_100", "--variants", "dense", "dsr", "--parallel", "2",
                           tmp_path=tmp_path)
    assert {r["variant"] for r in memory["results"]} == {"dense", "dsr"}
    assert all(r["peak_bytes"] > 0 for r in memory["results"])


# --- the quick forms: every benchmark end to end in seconds, its JSON rendered as the docs render it -------------
def quick(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "commit" in result.stdout and "cores" in result.stdout  # the machine and the commit in the header
    return result


def rendered(renderer_name: str, report: dict) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import docs_tables
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return getattr(docs_tables, renderer_name)(report)


def test_step_time_quick_form(tmp_path):
    quick("step_time", tmp_path, "--variants", "dense", "static", "rigl", "prune", "--output", str(tmp_path / "s.json"))
    report = json.loads((tmp_path / "s.json").read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"dense", "static", "rigl", "prune"} and rows["rigl"]["update_ms"] > 0
    assert {r["model"] for r in rows.values()} == {"lenet_300_100"} and report["threads"] == 2 and report["commit"]
    assert "| lenet_300_100 (100, 28 px) |" in rendered("_step_time", report)


def test_reallocation_quick_form_interleaves_per_thread_count_and_load(tmp_path):
    quick("reallocation", tmp_path, "--loads", "0", "1", "--output", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {(r["variant"], r["threads"], r["load"]) for r in rows} == {(v, 1, load) for v in ("dsr", "rigl")
                                                                          for load in (0, 1)}
    assert all(r["median_ms"] > 0 and r["repeats"] == 2 for r in rows)
    table = rendered("_reallocation", {"results": rows})
    assert "| 1M | 1 thread, quiet |" in table and "| 1M | 1 thread, load 1 |" in table


def test_inference_condensed_and_shrink_quick_forms(tmp_path):
    quick("inference", tmp_path, "--output", str(tmp_path / "i.json"))
    inference = json.loads((tmp_path / "i.json").read_text())
    assert {(r["format"], r["threads"]) for r in inference["results"]} == {("dense", 1), ("csr", 1)}
    assert "| mlp_4096x3 | 1 | 1 thread, quiet |" in rendered("_inference", inference)
    quick("condensed", tmp_path, "--output-dir", str(tmp_path))
    condensed = json.loads((tmp_path / "condensed.json").read_text())
    assert {(r["batch"], r["threads"]) for r in condensed["results"]} == {(b, t) for b in (1, 32) for t in (1, 2)}
    assert "| mlp | 1 | 2 threads, quiet |" in rendered("_condensed", condensed)
    quick("shrink", tmp_path, "--output-dir", str(tmp_path))
    shrink = json.loads((tmp_path / "shrink.json").read_text())
    assert all(r["params"] < r["dense_params"] for r in shrink["results"])
    assert "| mlp | 0.5 | 1 | 1 thread, quiet |" in rendered("_shrink", shrink)


def test_memory_quick_form_measures_the_update_step_too(tmp_path):
    quick("memory", tmp_path, "--output", str(tmp_path / "m.json"))
    rows = {r["variant"]: r for r in json.loads((tmp_path / "m.json").read_text())["results"]}
    assert set(rows) == {"dense", "static", "rigl"}
    assert all(r["update_peak_bytes"] > 0 and r["update_ratio_to_dense"] > 0.5 for r in rows.values())
    assert "(dense " in rendered("_memory", {"results": list(rows.values())})


def test_masking_kernels_quick_form_checks_exactness(tmp_path):
    quick("masking_kernels", tmp_path, "--output", str(tmp_path / "k.json"))
    rows = {r["kernel"]: r for r in json.loads((tmp_path / "k.json").read_text())["results"]}
    assert rows["bit product"]["exact"] and rows["masked_fill"]["exact"] and rows["where"]["ratio_to_where"] == 1
    assert not rows["float multiply"]["exact"] and not rows["uint8 multiply"]["exact"]  # NaN * 0 stays NaN
    assert "| lenet 784x300 | 1 thread, quiet |" in rendered("_masking_kernels", {"results": list(rows.values())})


def test_every_published_table_renders():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import docs_tables
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name, (file, _) in docs_tables.TABLES.items():
        if (docs_tables.RESULTS / file).exists():
            assert docs_tables.render(name).startswith("| "), name
