"""Peak memory of one training step, dst_prune and the peers against dense, each in its own process.

On CPU the peak resident set of the step is read from the kernel (`/proc/self/status` VmHWM, reset just
before the step through `/proc/self/clear_refs`); on CUDA, `torch.cuda.max_memory_allocated`.

    python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from common import MODELS, machine, table, variants, write_json

VARIANTS = ["dense", "static", "dsr", "rigl", "snfs", "prune", "rigl-torch", "sparsimony-rigl"]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(model_name: str, label: str, device_name: str) -> dict:
    """Build one variant, warm it up, and measure the peak memory of one more step (run in a subprocess)."""
    torch.set_num_threads(2)
    device = torch.device(device_name)
    batch_size, size = MODELS[model_name]
    batch = (torch.randn(batch_size, 3, size, size).to(device), torch.randint(0, 100, (batch_size,)).to(device))
    (_, factory), = variants([label])
    variant = factory(model_name, size, device, batch, contextlib.nullcontext)
    for _ in range(2):
        variant.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        variant.step()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated()}
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    variant.step()
    return {"peak_bytes": _status("VmHWM"), "rss_before_step": before}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/memory.json"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one, args.device)))
        return []
    results = []
    for model_name in args.models:
        for label in args.variants:
            run = subprocess.run([sys.executable, __file__, "--one", model_name, label, "--device", args.device],
                                 capture_output=True, text=True)
            row = {"model": model_name, "variant": label}
            if run.returncode:
                row["error"] = run.stderr.strip().splitlines()[-1][:100]
            else:
                row.update(json.loads(run.stdout.strip().splitlines()[-1]))
            results.append(row)
        dense = next(r["peak_bytes"] for r in results if r["model"] == model_name and r["variant"] == "dense")
        for r in results:
            if r["model"] == model_name and "peak_bytes" in r:
                r["ratio_to_dense"] = r["peak_bytes"] / dense
    rows = [[r["model"], r["variant"], *([r["error"], ""] if "error" in r else
            [f"{r['peak_bytes'] / 2**20:.0f}", f"{r['ratio_to_dense']:.3f}"])] for r in results]
    print(f"peak memory of a training step at sparsity 0.9, {machine()} ({args.device})")
    print(table(["model", "variant", "peak MiB", "x dense"], rows))
    write_json(args.output, {"machine": machine(), "device": args.device, "results": results})
    return results


if __name__ == "__main__":
    main()
