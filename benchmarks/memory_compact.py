"""Peak training memory and step time with compact optimizer state (`dst_prune.optim`) and freed gradients.

Variants (`compact_variants.py`): `dense` (torch's optimizer), `masked` (dst_prune with torch's optimizer: state
and gradients dense), `compact` (dst_prune.optim: state over the active weights only), `compact_free` (also
`free_gradients=True`), and the peers `prune` (plain torch.nn.utils.prune, random masks) and `sparsimony` (its
RigL), for a GPT-2-small-shaped model (`GPT2Config()`, 124M parameters, batch 1, sequence 128, fp32, AdamW) and
torchvision's resnet50 (batch 2 at 224 px, SGD with momentum), at several sparsities. dst_prune runs RigL with an
update every 4 steps, so the measured steps include updates (and the dense gradients RigL captures before them).

Memory: each variant runs in a fresh process. After the imports and the model build, the process's resident set
is the baseline (the dense weights and the libraries); the peak resident set (`VmHWM`) of everything after it
(apply, optimizer, warm-up and measured steps) minus the baseline is the training memory reported. Child
processes run with `MALLOC_MMAP_THRESHOLD_=131072`, so that glibc maps every tensor of 128 KiB or more on its
own and unmaps it when freed: the resident set then follows the tensors alive (glibc's default, a threshold
that grows to 32 MiB as blocks are freed, keeps freed memory resident and makes peaks depend on history).
The "ideal" line subtracts from dense what the inactive weights' gradient and optimizer state cost.

Time: one more process per model builds dense, masked, compact and compact_free at 90% sparsity and times them in
interleaved rounds (one step of each per round, the order rotating), without updates; `optimizer ms` is
`optimizer.step()` alone (for compact_free the update runs inside backward, so it is bookkeeping only).

    python benchmarks/memory_compact.py                  # ~25 min on 2 CPU cores
    python benchmarks/memory_compact.py --quick          # tiny models, a minute (the test suite runs it)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import commit, machine, table, write_json
from compact_variants import MODELS, SPARSE, VARIANTS, Variant, n_sparse

HERE = Path(__file__).resolve().parent
STATE_BYTES = {"adamw": 8, "sgd": 4}  # per weight: two moments / one momentum buffer
TIMED = ["dense", "masked", "compact", "compact_free"]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(model_name: str, variant: str, sparsity: float, args: argparse.Namespace) -> dict:
    """Train one variant in this (fresh) process; its peak memory above the post-build baseline, its step times."""
    torch.set_num_threads(args.threads)
    workload = MODELS[model_name](args.quick)
    sparse_weights = n_sparse(workload.model)
    gc.collect()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak counts from here
    run = Variant(variant, workload, sparsity, args.method, args.update_every)
    steps, optimizer = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        run.step()
        if i >= args.warmup:
            steps.append(time.perf_counter() - start)
            optimizer.append(run.optimizer_seconds)
    return {"peak_bytes": _status("VmHWM") - baseline, "baseline_bytes": baseline,
            "step_ms": 1000 * statistics.median(steps), "optimizer_ms": 1000 * statistics.median(optimizer),
            "state_bytes": run.state_bytes(), "updates": run.dst.update_index if run.dst else None,
            "n_sparse": sparse_weights, "state_bytes_per_weight": STATE_BYTES[workload.optimizer],
            "fingerprint": run.fingerprint()}


def interleaved(model_name: str, sparsity: float, args: argparse.Namespace) -> dict:
    """Step and optimizer times of `TIMED`, built in this process and run in rotating interleaved rounds.

    Then `optimizer.step()` alone, again in rotating rounds (3 per step round), on the gradients of each variant's
    last step (compact_free has none left: its update ran inside backward).
    """
    torch.set_num_threads(args.threads)
    runs = {v: Variant(v, MODELS[model_name](args.quick), sparsity, args.method, 10**9) for v in TIMED}
    steps: dict[str, list[float]] = {v: [] for v in TIMED}
    for round_ in range(args.warmup + args.rounds):
        for name in TIMED[round_ % len(TIMED):] + TIMED[:round_ % len(TIMED)]:
            start = time.perf_counter()
            runs[name].step()
            if round_ >= args.warmup:
                steps[name].append(time.perf_counter() - start)
    alone = [v for v in TIMED if v != "compact_free"]
    optimizer: dict[str, list[float]] = {v: [] for v in TIMED}
    for round_ in range(3 * args.rounds):
        for name in alone[round_ % len(alone):] + alone[:round_ % len(alone)]:
            start = time.perf_counter()
            runs[name].optimizer.step()
            optimizer[name].append(time.perf_counter() - start)
    optimizer["compact_free"] = [runs["compact_free"].optimizer_seconds]
    return {v: {"step_ms": 1000 * statistics.median(steps[v]), "optimizer_ms": 1000 * statistics.median(optimizer[v]),
                "rounds": len(steps[v]), "optimizer_rounds": len(optimizer[v])} for v in TIMED}


def child(arguments: list[str], args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(args.threads)}
    passed = ["--method", args.method, "--update-every", str(args.update_every), "--warmup", str(args.warmup),
              "--steps", str(args.steps), "--rounds", str(args.rounds), "--threads", str(args.threads)]
    run = subprocess.run([sys.executable, __file__, *arguments, *passed, *(["--quick"] if args.quick else [])],
                         capture_output=True, text=True, env=env)
    if run.returncode:
        return {"error": (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1][:160]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    parser.add_argument("--method", default="rigl")
    parser.add_argument("--update-every", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per memory process")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (0: no timing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny models, one sparsity (a smoke test)")
    parser.add_argument("--output", type=Path, default=HERE / "out" / "memory_compact.json")
    parser.add_argument("--render", type=Path, help="only draw the tables (.md) and plot (.png) of this JSON again")
    parser.add_argument("--timing-only", type=Path, help="only measure the times again, into this JSON")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "VARIANT", "SPARSITY"), help=argparse.SUPPRESS)
    parser.add_argument("--time", nargs=2, metavar=("MODEL", "SPARSITY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], float(args.one[2]), args)))
        return {}
    if args.time:
        print(json.dumps(interleaved(args.time[0], float(args.time[1]), args)))
        return {}
    if args.render:
        payload = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(payload))
        _plot(payload["results"], args.render.with_suffix(".png"))
        return payload
    if args.timing_only:
        return _timing_again(args)
    if args.quick:
        args.sparsities, args.warmup, args.steps, args.rounds = [0.9], 1, 3, min(args.rounds, 2)
        args.update_every = 2
    torch.set_num_threads(args.threads)
    results, timings = [], {}
    for model_name in args.models:
        for variant in args.variants:
            for sparsity in ([0.0] if variant == "dense" else args.sparsities):
                row = {"model": model_name, "variant": variant, "sparsity": sparsity,
                       **child(["--one", model_name, variant, str(sparsity)], args)}
                results.append(row)
                print(f"{model_name} {variant} {sparsity}: " + (row.get("error") or
                      f"{row['peak_bytes'] / 2**20:.0f} MiB, {row['step_ms']:.0f} ms"), flush=True)
        if args.rounds:
            timings[model_name] = child(["--time", model_name, "0.9"], args)
    _ratios(results, timings)
    payload = {"machine": machine(), "threads": args.threads, "arguments": {**vars(args), "output": str(args.output)},
               "results": results, "timing_at_0.9": timings}
    write_json(args.output, payload)
    payload = json.loads(args.output.read_text())
    print(f"peak training memory above the post-build baseline, {machine()}, commit {payload['commit']}; "
          f"dst_prune method {args.method}, update every {args.update_every} steps")
    print(table(["model", "variant", "sparsity", "peak MiB", "x dense", "ideal x", "step ms", "opt ms"],
                [[r["model"], r["variant"], f"{r['sparsity']:g}", *([r["error"], "", "", "", ""] if "error" in r else
                  [f"{r['peak_bytes'] / 2**20:.0f}", f"{r.get('ratio_to_dense', float('nan')):.3f}",
                   f"{r.get('ideal_ratio', float('nan')):.3f}", f"{r['step_ms']:.0f}",
                   f"{r['optimizer_ms']:.1f}"])] for r in results]))
    for model_name, timing in timings.items():
        if "error" in timing:
            print(f"{model_name} timing failed: {timing['error']}")
            continue
        print(f"{model_name}, 90% sparsity, interleaved rounds (median ms, ratio to dense / to masked):")
        print(table(["variant", "step ms", "x dense", "x masked", "optimizer ms", "x dense optimizer"],
                    [[v, f"{t['step_ms']:.0f}", f"{t['step_ratio_to_dense']:.3f}",
                      f"{t['step_ratio_to_masked']:.3f}", f"{t['optimizer_ms']:.1f}",
                      f"{t['optimizer_ratio_to_dense']:.3f}"] for v, t in timing.items()]))
    _plot(results, args.output.with_suffix(".png"))
    args.output.with_suffix(".md").write_text(markdown(payload))
    return payload


def markdown(payload: dict) -> str:
    """The published tables: peak memory per variant and sparsity (ratio to dense), and the timing at 90%."""
    args, results = payload["arguments"], payload["results"]
    sparsities = sorted({r["sparsity"] for r in results if r["variant"] != "dense"})
    lines = ["| model | variant | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |",
             "|---|---|" + "---|" * len(sparsities)]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            of = {r["sparsity"]: r for r in rows if r["variant"] == variant}
            if variant == "dense":
                cells = ["fails" if "error" in of[0.0] else f"{of[0.0]['peak_bytes'] / 2**20:.0f} MiB"]
                cells += ["(the same)"] * (len(sparsities) - 1)
            else:
                cells = ["" if s not in of else "fails" if "error" in of[s] else
                         f"{of[s]['peak_bytes'] / 2**20:.0f} MiB ({of[s].get('ratio_to_dense', float('nan')):.2f}x)"
                         for s in sparsities]
            lines.append(f"| {model} | {variant} | " + " | ".join(cells) + " |")
        ideal = {r["sparsity"]: r["ideal_ratio"] for r in rows if r["variant"] == "masked" and "ideal_ratio" in r}
        if ideal:
            lines.append(f"| {model} | ideal | " + " | ".join(f"({ideal[s]:.2f}x)" if s in ideal else ""
                                                               for s in sparsities) + " |")
    timed = {m: t for m, t in payload["timing_at_0.9"].items() if "error" not in t}
    if timed:
        lines += ["", "Time per step at sparsity 0.9, medians of interleaved rounds without updates; "
                  "`optimizer.step()` alone, medians of its own interleaved rounds (compact_free: what is left after "
                  "backward):", "",
                  "| model | variant | step ms | x dense | x masked | optimizer.step() ms | x dense |",
                  "|---|---" + "|---" * 5 + "|"]
    for model, timing in timed.items():
        for variant, t in timing.items():
            lines.append(f"| {model} | {variant} | {t['step_ms']:.0f} | {t['step_ratio_to_dense']:.2f} | "
                         f"{t['step_ratio_to_masked']:.2f} | {t['optimizer_ms']:.1f} | "
                         f"{t['optimizer_ratio_to_dense']:.2f} |")
    lines += ["", f"*`benchmarks/results/{Path(args['output']).name}`: measured on {payload['machine']}; "
                  f"commit {payload['commit']}; dst_prune `method=\"{args['method']}\"`, an update every "
                  f"{args['update_every']} steps, {args['warmup']} + {args['steps']} steps per process"
                  + (f"; times measured at commit {payload['timing_commit']}" if payload.get("timing_commit") else "")
                  + ".*"]
    return "\n".join(lines) + "\n"


def _timing_again(args: argparse.Namespace) -> dict:
    """Measure the interleaved times of an existing report again (its memory part stays, with its commit)."""
    payload = json.loads(args.timing_only.read_text())
    timings = {m: child(["--time", m, "0.9"], args) for m in dict.fromkeys(r["model"] for r in payload["results"])}
    _ratios([], timings)
    payload.update({"timing_at_0.9": timings, "timing_commit": commit(), "timing_threads": args.threads,
                    "timing_rounds": args.rounds})
    write_json(args.timing_only, payload)
    args.timing_only.with_suffix(".md").write_text(markdown(payload))
    print(args.timing_only.with_suffix(".md").read_text())
    return payload


def _ratios(results: list[dict], timings: dict) -> None:
    """Ratios to dense (memory, ideal), the weights' agreement with the masked run, and the timing ratios."""
    for r in results:
        dense = next((d for d in results if d["model"] == r["model"] and d["variant"] == "dense" and "error" not in d),
                     None)
        if "error" in r or dense is None:
            continue
        r["ratio_to_dense"] = r["peak_bytes"] / dense["peak_bytes"]
        saved = r["sparsity"] * r["n_sparse"] * (4 + r["state_bytes_per_weight"])  # inactive weights' grad + state
        r["ideal_ratio"] = (dense["peak_bytes"] - saved) / dense["peak_bytes"]
        masked = next((m for m in results if m["model"] == r["model"] and m["variant"] == "masked"
                       and m["sparsity"] == r["sparsity"] and "error" not in m), None)
        if masked is not None and r["variant"] in SPARSE[:3]:
            r["max_relative_weight_difference_to_masked"] = max(
                abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["fingerprint"], masked["fingerprint"]))
    for timing in timings.values():
        if "error" in timing:
            continue
        for t in timing.values():
            t["step_ratio_to_dense"] = t["step_ms"] / timing["dense"]["step_ms"]
            t["step_ratio_to_masked"] = t["step_ms"] / timing["masked"]["step_ms"]
            t["optimizer_ratio_to_dense"] = t["optimizer_ms"] / timing["dense"]["optimizer_ms"]


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    figure, axes = plt.subplots(1, len(models), figsize=(7.2 * len(models), 4.2), squeeze=False)
    for axis, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model and "error" not in r]
        dense = next((r for r in rows if r["variant"] == "dense"), None)
        sparse = [r for r in rows if r["variant"] != "dense"]
        for variant in dict.fromkeys(r["variant"] for r in sparse):
            points = sorted((r["sparsity"], r["peak_bytes"] / 2**20) for r in sparse if r["variant"] == variant)
            axis.plot(*zip(*points), marker="o", label=variant)
        if dense is not None:
            axis.axhline(dense["peak_bytes"] / 2**20, color="black", linestyle="--", label="dense")
            ideal = sorted((r["sparsity"], r["ideal_ratio"] * dense["peak_bytes"] / 2**20) for r in sparse
                           if r["variant"] == sparse[0]["variant"])
            if ideal:
                axis.plot(*zip(*ideal), color="gray", linestyle=":", label="ideal")
        axis.set(title=model, xlabel="sparsity", ylabel="peak training memory above baseline (MiB)")
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
