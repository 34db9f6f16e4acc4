"""The GPU suite's records: one command (`Job`), the machine, the targets (met / not met), the JSON and markdown."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

PARTS = {"tests": "CUDA tests (pytest -m gpu)", "step_time": "training step vs dense",
         "reallocation": "one topology update", "memory": "peak memory vs dense", "inference": "2:4 inference vs dense"}
OURS = ("static", "dsr", "rigl")


@dataclass
class Job:
    """One command of the suite, and what came of it."""

    part: str
    name: str
    argv: list[str]
    estimate_s: float
    output: Path | None = None  # the JSON (or junit XML) the command writes
    env: dict[str, str] = field(default_factory=dict)  # on top of the suite's environment
    status: str = "planned"  # then ok, failed, timed out or skipped
    note: str = ""
    wall_s: float | None = None
    returncode: int | None = None
    log: Path | None = None
    results: list | dict | None = None

    def command(self) -> str:
        """The exact command line, run from the repository root."""
        prefix = [f"{k}={v}" for k, v in self.env.items()]
        return shlex.join([*prefix, "python", *self.argv[1:]]) if self.argv[0] == sys.executable else \
            shlex.join([*prefix, *self.argv])

    def load_results(self) -> None:
        if self.output.suffix == ".xml":
            self.results = junit_summary(self.output)
        else:
            self.results = json.loads(self.output.read_text())["results"]

    def record(self) -> dict:
        wall = None if self.wall_s is None else round(self.wall_s, 1)
        return {"part": self.part, "name": self.name, "status": self.status, "note": self.note,
                "command": self.command(), "python": sys.executable, "cwd": "the repository root",
                "estimate_s": round(self.estimate_s, 1), "wall_s": wall, "returncode": self.returncode,
                "log": None if self.log is None else str(self.log), "results": self.results}


def junit_summary(path: Path) -> dict:
    """Counts and failures from pytest's --junitxml file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}: {(problem.get('message') or '')[:200]}"
              for case in root.iter("testcase") for problem in case if problem.tag in ("failure", "error")]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _commit(root: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" with local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DST_PRUNE_COMMIT", "unknown (no git metadata in this copy; set DST_PRUNE_COMMIT)")


def machine_info(device: str, root: Path) -> dict:
    """GPU, versions and commit; exits with what to install when the checkout's dst_prune cannot be imported."""
    sys.path.insert(0, str(root))
    try:
        import dst_prune
        import dst_prune.integrations  # installed through pyproject.toml's package-dir only
    except ImportError as error:
        sys.exit(f"dst_prune cannot be imported ({error}). From the repository root run `pip install -e . --no-deps` "
                 f"first (it maps integrations/ to dst_prune.integrations), and install what it names as missing "
                 f"(dst_prune needs torch, torchvision, timm, accelerate, numpy, prettytable and tqdm).")
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            **{name: _version(name) for name in ("torchvision", "timm", "accelerate", "numpy")},
            "dst_prune": f"{dst_prune.__version__} from {Path(dst_prune.__file__).parent}", "commit": _commit(root)}
    if device == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info |= {"gpu": properties.name, "gpus": torch.cuda.device_count(),
                 "compute_capability": f"{properties.major}.{properties.minor}",
                 "gpu_memory_gib": round(properties.total_memory / 2**30, 1)}
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown (nvidia-smi did not answer)"
    return info


def _row(target: str, subject: str, measured: str, limit: str, met: bool | None, judged: bool) -> dict:
    result = ("met" if met else "not met") if judged else "not judged (quick form: not the targets' configuration)"
    return {"target": target, "subject": subject, "measured": measured, "limit": limit, "result": result}


def targets(jobs: list[Job], judged: bool) -> list[dict]:
    """Every measurement that a target speaks of, each met / not met; a target with none says why."""
    rows: list[dict] = []
    names = {"step": "training step within 1% of dense (bf16, batch 256)",
             "update": "update per 25M weights: DSR under 5 ms, RigL under 20 ms",
             "memory": "peak memory within 1.05x dense", "two_four": "2:4 inference faster than dense (vit_base MLP "
                                                                     "blocks, batch 256)"}

    def found(part: str) -> list[tuple[Job, dict]]:
        return [(j, r) for j in jobs if j.part == part and isinstance(j.results, list) for r in j.results]

    for _, r in found("step_time"):
        if r.get("variant") in OURS and "ratio_to_dense" in r:
            mode = "compiled" if r.get("compiled") else "eager"
            rows.append(_row(names["step"], f"{r['model']} batch {r['batch']}, {mode}, {r['variant']}",
                             f"{r['ratio_to_dense']:.3f}x dense", "<= 1.010x", r["ratio_to_dense"] <= 1.01, judged))
    for _, r in found("reallocation"):
        limit = {"dsr": 5.0, "rigl": 20.0}.get(r.get("variant"))
        if limit and "ms_per_25M" in r:
            rows.append(_row(names["update"], f"{r['variant']} at {r['weights_millions']:.1f}M weights",
                             f"{r['ms_per_25M']:.1f} ms per 25M", f"< {limit:.0f} ms", r["ms_per_25M"] < limit,
                             judged and r["weights_millions"] >= 25))
    for _, r in found("memory"):
        if r.get("variant") in OURS and "ratio_to_dense" in r:
            rows.append(_row(names["memory"], f"{r['model']}, {r['variant']}", f"{r['ratio_to_dense']:.3f}x dense",
                             "<= 1.050x", r["ratio_to_dense"] <= 1.05, judged))
    for _, r in found("inference"):
        if r.get("model") == "vit_base_mlp" and r.get("format", "").startswith("semi_structured"):
            rows.append(_row(names["two_four"], f"{r['model']} batch {r['batch']}, {r['format']}",
                             f"{1 / r['ratio_to_dense']:.2f}x the speed of dense", "> 1.00x",
                             r["ratio_to_dense"] < 1.0, judged and r["batch"] == 256))
    for key, part in (("step", "step_time"), ("update", "reallocation"), ("memory", "memory"),
                      ("two_four", "inference")):
        if not any(r["target"] == names[key] for r in rows):
            why = "; ".join(f"{j.name}: {j.status}{' - ' + j.note if j.note else ''}" for j in jobs if j.part == part)
            rows.append({"target": names[key], "subject": "-", "measured": "-", "limit": "-",
                         "result": f"not measured ({why or 'no command'})"})
    return rows


def _table(columns: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows], ""]


def _note(job: Job) -> str:
    if isinstance(job.results, dict):  # pytest's counts
        counts = job.results
        text = f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
        return "; ".join([text, *counts["failed"][:5], *([job.note] if job.note else [])])
    return job.note


def _mode(r: dict) -> str:
    if not r.get("compiled"):
        return "eager"
    late = f", {r['graphs_during_rounds']} more while timed" if r.get("graphs_during_rounds") else ""
    return f"compiled ({r.get('graphs', '?')} graphs{late})"


def _ms(r: dict, key: str) -> str:
    return f"{r[key]:.1f}" if key in r else "-"


def markdown(jobs: list[Job], rows: list[dict], info: dict, run: dict) -> str:
    gpu = (f"{info['gpu']} (compute capability {info['compute_capability']}, {info['gpu_memory_gib']} GiB, driver "
           f"{info['driver']})" if "gpu" in info else f"no GPU ({info['platform']}, {info['cpus']} CPUs)")
    failed = [j for j in jobs if j.status in ("failed", "timed out")]
    lines = ["# dst_prune GPU validation suite", "",
             f"- machine: {gpu}", f"- software: Python {info['python']}, torch {info['torch']} (built for CUDA "
             f"{info['cuda']}, cuDNN {info['cudnn']}), torchvision {info['torchvision']}, timm {info['timm']}, "
             f"accelerate {info['accelerate']}", f"- code: dst_prune {info['dst_prune']}, commit {info['commit']}",
             f"- form: {run['form']}; budget {run['budget_s']:.0f} s, took {run['wall_s']:.0f} s; repeats: "
             f"{', '.join(f'{k} {v}' for k, v in run['repeats'].items())}",
             f"- result: {len(failed)} of {len(jobs)} commands failed (exit status {run['exit_code']})" if failed else
             f"- result: no command failed (exit status {run['exit_code']}); a target not met is a finding, not a "
             f"failure", "", "## Parts", ""]
    lines += _table(["part", "command", "status", "seconds (estimated)", "note"], [
        [PARTS[j.part], j.name, j.status, f"{j.wall_s:.0f} ({j.estimate_s:.0f})" if j.wall_s else
         f"- ({j.estimate_s:.0f})", _note(j)] for j in jobs])
    lines += ["## Targets", ""]
    lines += _table(["target", "measured on", "measured", "limit", "result"],
                    [[r["target"], r["subject"], r["measured"], r["limit"], r["result"]] for r in rows])
    sections = {
        "step_time": (["model", "batch", "mode", "variant", "median ms", "x dense", "update ms", "x dense amortized"],
                      lambda r: [r["model"], r.get("batch", "-"), _mode(r),
                                 r["variant"], _ms(r, "median_ms"), f"{r['ratio_to_dense']:.3f}"
                                 if "ratio_to_dense" in r else "not installed", _ms(r, "update_ms"),
                                 f"{r['amortized_ratio']:.3f}" if "amortized_ratio" in r else "-"]),
        "reallocation": (["weights", "variant", "median ms", "ms per 25M", "note"],
                         lambda r: [f"{r['weights_millions']:.1f}M", r["variant"], _ms(r, "median_ms"),
                                    _ms(r, "ms_per_25M"), r.get("error", "")]),
        "memory": (["model", "variant", "peak MiB", "x dense", "note"],
                   lambda r: [r["model"], r["variant"], f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-",
                              f"{r['ratio_to_dense']:.3f}" if "ratio_to_dense" in r else "-", r.get("error", "")]),
        "inference": (["model", "batch", "format", "median ms", "x dense"],
                      lambda r: [r["model"], r["batch"], r["format"], f"{r['median_ms']:.2f}",
                                 f"{r['ratio_to_dense']:.3f}"])}
    for part, (columns, cells) in sections.items():
        results = [r for j in jobs if j.part == part and isinstance(j.results, list) for r in j.results]
        if results:
            lines += [f"## {PARTS[part].capitalize()}", "", *_table(columns, [cells(r) for r in results])]
    lines += ["## Commands", "", "Run from the repository root, in this order:", "", "```",
              *[f"# {j.part}: {j.name} ({j.status})\n{j.command()}" for j in jobs], "```", ""]
    return "\n".join(lines)


def write_reports(folder: Path, jobs: list[Job], rows: list[dict], info: dict, run: dict) -> str:
    """`<part>.json` for each part, `suite.json` and `summary.md`; returns the markdown."""
    for part in PARTS:
        mine = [j for j in jobs if j.part == part]
        statuses = {j.status for j in mine}
        status = next((s for s in ("failed", "timed out") if s in statuses), "ok" if statuses == {"ok"} else
                      "skipped" if statuses == {"skipped"} else "partly skipped")
        (folder / f"{part}.json").write_text(json.dumps({
            "part": part, "description": PARTS[part], "status": status, "machine": info, "form": run["form"],
            "commands": [j.command() for j in mine], "jobs": [j.record() for j in mine],
            "targets": [r for r in rows if part in _target_parts(r["target"])]}, indent=1))
    (folder / "suite.json").write_text(json.dumps({"machine": info, **run, "parts": {
        p: json.loads((folder / f"{p}.json").read_text())["status"] for p in PARTS},
        "jobs": [j.record() | {"results": None} for j in jobs], "targets": rows}, indent=1))
    text = markdown(jobs, rows, info, run)
    (folder / "summary.md").write_text(text)
    return text


def _target_parts(target: str) -> set[str]:
    return {"training step": {"step_time"}, "update per": {"reallocation"}, "peak memory": {"memory"},
            "2:4 inference": {"inference"}}[next(k for k in ("training step", "update per", "peak memory",
                                                              "2:4 inference") if target.startswith(k))]
