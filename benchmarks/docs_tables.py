"""Markdown tables from the JSON results in `benchmarks/results/`, with the machine and the commit of each.

Used two ways:

    python benchmarks/docs_tables.py step_time          # print one table (or: all)
    mkdocs build                                        # as a hook (mkdocs.yml): `<!-- table: NAME -->` lines
                                                        # of a page are replaced by the table

The commit is the one the JSON records (benchmarks write it since 0.2.0), else the last commit that changed
the file. Only the standard library is needed.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- table: ([a-z0-9_]+) -->$", re.MULTILINE)


def _commit(path: Path, data: dict) -> str:
    if data.get("commit"):
        return f"commit {data['commit']}"
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h (%ad)", "--date=short", "--", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"results committed in {out}" if out else "commit unknown"


def _markdown(columns: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _in_order(values) -> list:
    return list(dict.fromkeys(values))


def _step_time(data: dict) -> str:
    results = data["results"]
    variants = [v for v in _in_order(r["variant"] for r in results) if v != "dense"]
    rows = []
    for model in _in_order(r["model"] for r in results):
        of = {r["variant"]: r for r in results if r["model"] == model}
        dense = of.get("dense")
        cells = []
        for variant in variants:
            r = of.get(variant)
            if r is None:
                cells.append("")
                continue
            cell = f"{r['ratio_to_dense']:.3f}"
            if "amortized_ratio" in r:
                cell += f" ({r['amortized_ratio']:.3f})"
            if "update_error" in r:
                cell += " (update fails)"
            cells.append(cell)
        first = next(iter(of.values()))
        rows.append([f"{model} ({first['batch']}, {first['image']} px)",
                     f"{dense['median_ms']:.1f}" if dense else "", *cells])
    return _markdown(["model (batch, image)", "dense ms", *variants], rows)


def _configuration(row: dict) -> str:
    """`1 thread, quiet` / `2 threads, load 2` (busy-loop processes beside the benchmark)."""
    threads = row.get("threads")
    text = "" if threads is None else f"{threads} thread{'s' if threads != 1 else ''}, "
    return text + (f"load {row['load']}" if row.get("load") else "quiet")


def _reallocation(data: dict) -> str:
    results = data["results"]
    variants = _in_order(r["variant"] for r in results)
    rows = []
    for size, threads, load in _in_order((r["weights_millions"], r.get("threads"), r.get("load")) for r in results
                                         if "threads" in r or "error" not in r):
        of = {r["variant"]: r for r in results if (r["weights_millions"], r.get("threads"), r.get("load")) ==
              (size, threads, load)}
        ms = {v: of[v]["median_ms"] for v in of if "median_ms" in of[v]}
        ratios = []
        for ours, peer in (("rigl", "sparsimony-rigl"), ("srigl", "rigl")):
            ratios.append(f"{ms[ours] / ms[peer]:.2f}" if ours in ms and peer in ms else "")
        rows.append([f"{size:.0f}M", _configuration({"threads": threads, "load": load}),
                     *(("fails" if "error" in of[v] else f"{of[v]['ms_per_25M']:.0f}") if v in of else ""
                       for v in variants), *ratios])
    return _markdown(["sparse weights", "threads, load", *variants, "rigl / sparsimony-rigl", "srigl / rigl"], rows)


def _memory(data: dict) -> str:
    results = data["results"]
    variants = [v for v in _in_order(r["variant"] for r in results) if v != "dense"]
    rows = []
    for model in _in_order(r["model"] for r in results):
        of = {r["variant"]: r for r in results if r["model"] == model}
        dense = of.get("dense")
        cells = []
        for v in variants:
            r = of.get(v, {})
            cell = f"{r['ratio_to_dense']:.3f}" if "ratio_to_dense" in r else ""
            if "update_ratio_to_dense" in r:
                cell += f" ({r['update_ratio_to_dense']:.3f})"
            cells.append(cell)
        rows.append([f"{model} (dense {dense['peak_bytes'] / 2**20:.0f} MiB)" if dense else model, *cells])
    return _markdown(["model", *variants], rows)


def _inference(data: dict) -> str:
    results = [r for r in data["results"] if r["format"] != "dense"]
    columns = _in_order((r["format"], r["sparsity"]) for r in results)
    rows = []
    for key in _in_order((r["model"], r["batch"], r.get("threads"), r.get("load")) for r in results):
        of = {(r["format"], r["sparsity"]): r for r in results
              if (r["model"], r["batch"], r.get("threads"), r.get("load")) == key}
        rows.append([key[0], key[1], _configuration({"threads": key[2], "load": key[3]}),
                     *(f"{1 / of[c]['ratio_to_dense']:.2f}x" if c in of else "" for c in columns)])
    return _markdown(["model", "batch", "threads, load", *(f"{f} at {s:g}" for f, s in columns)], rows)


def _condensed(data: dict) -> str:
    rows = [[r["model"], r["batch"], _configuration(r), f"{r['effective_sparsity']:.3f}", f"{r['dense_ms']:.2f}",
             f"{r['csr_speedup']:.2f}x", f"{r['condensed_speedup']:.2f}x"] for r in data["results"]]
    return _markdown(["model", "batch", "threads, load", "sparsity", "dense ms", "csr vs dense", "condensed vs dense"],
                     rows)


def _shrink(data: dict) -> str:
    rows = [[r["model"], r["sparsity"], r["batch"], _configuration(r), f"{r['params'] / r['dense_params']:.2f}",
             f"{r['flops'] / r['dense_flops']:.2f}", f"{r['dense_ms']:.2f}", f"{r['speedup']:.2f}x"]
            for r in data["results"]]
    return _markdown(["model", "channel sparsity", "batch", "threads, load", "params", "FLOPs", "dense ms",
                      "shrink vs dense"], rows)


def _masking_kernels(data: dict) -> str:
    results = data["results"]
    kernels = _in_order(r["kernel"] for r in results)
    exact = {r["kernel"]: r["exact"] for r in results}
    rows = []
    for shape, threads, load in _in_order((r["shape"], r["threads"], r["load"]) for r in results):
        of = {r["kernel"]: r for r in results if (r["shape"], r["threads"], r["load"]) == (shape, threads, load)}
        rows.append([shape, _configuration({"threads": threads, "load": load}),
                     *(f"{of[k]['median_ms']:.2f} ({of[k]['ratio_to_where']:.2f})" if k in of else ""
                       for k in kernels)])
    return _markdown(["weights", "threads, load", *(k if exact[k] else f"{k} (not exact)" for k in kernels)], rows)


def _mnist_methods(data: dict) -> str:
    runs = data["runs"]
    sparsities = sorted({r["sparsity"] for r in runs if r["method"] != "dense"})
    rows = []
    for method in _in_order(r["method"] for r in runs):
        cells = []
        for s in sparsities:
            accuracies = [100 * r["accuracy"] for r in runs if r["method"] == method and
                          (r["sparsity"] == s or method == "dense")]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            cells.append(f"{statistics.mean(accuracies):.2f} ± {spread:.2f}")
        rows.append([method, *cells])
    return _markdown(["method", *(f"sparsity {s:g}" for s in sparsities)], rows)


TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "step_time": ("step_time.json", _step_time),
    "step_time_loaded": ("step_time_loaded.json", _step_time),
    "step_time_compiled": ("step_time_compiled.json", _step_time),
    "step_time_vit_small_40_rounds": ("step_time_vit_small_40_rounds.json", _step_time),
    "reallocation": ("reallocation.json", _reallocation),
    "reallocation_100m": ("reallocation_100m.json", _reallocation),
    "memory": ("memory.json", _memory),
    "inference": ("inference.json", _inference),
    "inference_vit_small": ("inference_vit_small.json", _inference),
    "condensed": ("condensed.json", _condensed),
    "shrink": ("shrink.json", _shrink),
    "mnist_methods": ("mnist_methods.json", _mnist_methods),
    "masking_kernels": ("masking_kernels.json", _masking_kernels),
}


def render(name: str) -> str:
    """The markdown table `name` (a key of `TABLES`), followed by the machine and the commit it was measured at."""
    if name not in TABLES:
        raise KeyError(f"no benchmark table {name!r}; known: {', '.join(TABLES)}")
    file, renderer = TABLES[name]
    path = RESULTS / file
    data = json.loads(path.read_text())
    machine = f"measured on {data['machine']}" if data.get("machine") else "machine not recorded"
    return f"{renderer(data)}\n\n*`benchmarks/results/{file}`: {machine}; {_commit(path, data)}.*"


def on_page_markdown(markdown: str, page=None, config=None, files=None) -> str:
    """mkdocs hook: replace every `<!-- table: NAME -->` line by the rendered table."""
    return MARKER.sub(lambda m: render(m.group(1)), markdown)


if __name__ == "__main__":
    for table in (TABLES if sys.argv[1:] in ([], ["all"]) else sys.argv[1:]):
        print(f"## {table}\n\n{render(table)}\n")
