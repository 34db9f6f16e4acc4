"""The GPU suite (benchmarks/gpu_suite.py): its plan, its failure handling, and its quick CPU form end to end."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import dst_prune

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = {"tests", "step_time", "reallocation", "memory", "inference"}


@pytest.fixture
def suite(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_suite

    return gpu_suite


def test_the_gpu_plan_covers_every_part_within_the_budget():
    result = subprocess.run([sys.executable, str(SUITE), "--plan-only"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert {line.split()[3].rstrip(":") for line in out.splitlines() if line[:1].isalpha() and " s  " in line} == PARTS
    planned = float(out.split("estimated ")[1].split(" s of ")[0])
    assert 0 < planned <= 420
    for piece in ("-m pytest -m gpu", "--autocast bf16", "--batch 256 --image-size 224", "--channels-last",
                  "--compile --compile-backend inductor", "--sizes 25 100", "--formats semi_structured",
                  "--models vit_base_mlp", "--half-dtypes float16 bfloat16", "--device cuda"):
        assert piece in out, piece


def test_a_tight_budget_skips_the_least_important_commands(suite):
    def plan(budget: float):
        args = argparse.Namespace(quick=False, device="cuda", budget_s=budget, parts=list(PARTS), threads=8,
                                  startup=10.0, output_dir=Path("/nonexistent"))
        jobs, level = suite.fit(args)
        assert sum(j.estimate_s for j in jobs if j.status == "planned") <= budget
        return [j.status == "planned" for j in jobs], jobs, level

    tight, jobs, _ = plan(100.0)
    assert tight[0] and jobs[0].part == "tests"  # the most important first
    skipped = [j for j in jobs if j.status == "skipped"]
    assert skipped and all(j.note.startswith("would not fit the budget") for j in skipped)
    default, _, _ = plan(420.0)
    everything, _, level = plan(10_000.0)
    assert sum(tight) < sum(default) < sum(everything) == len(everything)
    assert level == suite.LEVELS[0]  # what fits anyway gets the most repeats


def test_a_failing_or_hanging_command_does_not_stop_the_others(suite, tmp_path):
    from gpu_suite_report import Job, targets, write_reports

    (tmp_path / "logs").mkdir()
    good, stale = tmp_path / "good.json", tmp_path / "stale.json"
    stale.write_text('{"results": [{"variant": "dsr", "weights_millions": 25, "ms_per_25M": 1.0}]}')  # a past run's
    jobs = [Job("reallocation", "fails", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 1.0,
                stale),
            Job("memory", "hangs", [sys.executable, "-c", "import time; time.sleep(60)"], 1.0),
            Job("step_time", "works", [sys.executable, "-c", f"open({str(good)!r}, 'w').write('{{\"results\": []}}')"],
                1.0, good)]
    args = argparse.Namespace(budget_s=5.0, jobs=1, output_dir=tmp_path)
    wall = suite.execute(jobs, args, {})
    assert [j.status for j in jobs] in (["failed", "timed out", "ok"], ["failed", "timed out", "skipped"])
    assert jobs[0].note == "exit status 3: boom" and jobs[0].returncode == 3 and jobs[0].results is None
    assert jobs[1].note.startswith("stopped after") and wall < 30
    rows = targets(jobs, judged=True)
    assert {r["target"] for r in rows} == {r["target"] for r in rows if r["result"].startswith("not measured")}
    info = {"python": "3", "platform": "p", "cpus": 2, "torch": "t", "cuda": None, "cudnn": None, "torchvision": "v",
            "timm": "m", "accelerate": "a", "numpy": "n", "dst_prune": "d", "commit": "c"}
    text = write_reports(tmp_path, jobs, rows, info, {"form": "test", "budget_s": 5, "wall_s": wall, "repeats": {},
                                                      "exit_code": 1, "arguments": {}})
    assert "| one topology update | fails | failed |" in text and "exit status 3: boom" in text
    assert json.loads((tmp_path / "suite.json").read_text())["parts"]["memory"] == "timed out"


@pytest.mark.slow
def test_the_quick_cpu_form_writes_every_part(tmp_path):
    command = [sys.executable, str(SUITE), "--device", "cpu", "--quick", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["parts"] == {"tests": "ok", "step_time": "ok", "reallocation": "ok", "memory": "ok",
                              "inference": "skipped"}
    assert suite["exit_code"] == 0 and suite["form"] == "quick on cpu"
    assert {"python", "torch", "cuda", "timm", "dst_prune", "commit"} <= set(suite["machine"])
    parts = {p: json.loads((tmp_path / f"{p}.json").read_text()) for p in PARTS}
    for name, part in parts.items():
        assert part["part"] == name and part["machine"] == suite["machine"] and part["commands"]
        assert all(j["command"] in part["commands"] and j["estimate_s"] > 0 for j in part["jobs"])
    tests = parts["tests"]["jobs"][0]["results"]
    # every method in float32, and DSR in bf16 autocast and channels_last; the four 2:4 tests skip on a CPU
    methods = len(dst_prune.list_methods())
    assert tests["passed"] == methods + 2 and tests["failures"] == tests["errors"] == 0 and tests["skipped"] == 4
    rows = [r for j in parts["step_time"]["jobs"] for r in j["results"]]
    assert {(r["model"], r["variant"], r["compiled"]) for r in rows} == {
        *((m, v, False) for m in ("test_resnet", "test_vit") for v in ("dense", "static", "dsr", "rigl", "prune")),
        ("test_vit", "dense", True), ("test_vit", "dsr", True)}
    assert all(r["median_ms"] > 0 and r["ratio_to_dense"] > 0 for r in rows)
    assert {r["variant"] for r in parts["reallocation"]["jobs"][0]["results"]} == {"dsr", "rigl"}
    memory = parts["memory"]["jobs"][0]["results"]
    assert [r["variant"] for r in memory] == ["dense", "dsr"] and all(r["peak_bytes"] > 0 for r in memory)
    assert parts["inference"]["jobs"][0]["status"] == "skipped"
    assert "NVIDIA GPU" in parts["inference"]["jobs"][0]["note"]
    results = {r["result"] for r in suite["targets"]}
    assert results == {"not judged (quick form: not the targets' configuration)",
                       "not measured (2:4 semi_structured: skipped - 2:4 semi-structured kernels need an NVIDIA GPU "
                       "(CUDA))"}
    assert len({r["target"] for r in suite["targets"]}) == 4
    summary = (tmp_path / "summary.md").read_text()
    for heading in ("## Parts", "## Targets", "## Training step vs dense", "## One topology update",
                    "## Peak memory vs dense", "## Commands"):
        assert heading in summary
    assert "DST_PRUNE_GPU_TESTS_DEVICE=cpu python -m pytest -m gpu" in summary
    assert summary in result.stdout
