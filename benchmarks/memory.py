"""Peak memory of one training step and of a step with a topology update, against dense, each in its own process.

The update step is what a method's peak is: the step before an update captures the dense gradient (RigL,
SRigL, GraNet) and the update itself ranks and writes; measured as one update (`Variant.update`: the capture,
a forward and backward, the reallocation) followed by an ordinary step, against two dense steps.

On CPU the peak resident set of the step is read from the kernel (`/proc/self/status` VmHWM, reset just
before the step through `/proc/self/clear_refs`); on CUDA, `torch.cuda.max_memory_allocated` of the step after
`torch.cuda.reset_peak_memory_stats` (what the tensors of the model, the optimizer and the step hold at the peak;
the caching allocator's reserve is reported beside it). Each process measures only itself, so `--parallel 2` runs
two at a time (on a GPU, as long as two steps fit in its memory).

    python benchmarks/memory.py
    python benchmarks/memory.py --device cuda --autocast bf16 --models resnet50 --batch 256 --image-size 224
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import torch
from common import MODELS, MORE_MODELS, machine, table, variants, write_json

VARIANTS = ["dense", "static", "dsr", "rigl", "srigl", "snfs", "prune", "rigl-torch", "sparsimony-rigl"]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(model_name: str, label: str, args: argparse.Namespace) -> dict:
    """Build one variant, warm it up, and measure the peak memory of one more step (run in a subprocess)."""
    torch.set_num_threads(2)
    device = torch.device(args.device)
    batch_size, size = (MODELS | MORE_MODELS)[model_name]
    batch_size, size = args.batch or batch_size, args.image_size or size
    if args.channels_last:
        common.MEMORY_FORMAT["value"] = torch.channels_last
    images = torch.randn(batch_size, common.CHANNELS.get(model_name, 3), size, size).to(
        device, memory_format=common.MEMORY_FORMAT["value"])
    batch = (images, torch.randint(0, 100, (batch_size,)).to(device))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.autocast == "bf16" else \
        contextlib.nullcontext
    (_, factory), = variants([label])
    variant = factory(model_name, size, device, batch, autocast)
    for _ in range(2):
        variant.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        variant.step()
        torch.cuda.synchronize()
        row = {"peak_bytes": torch.cuda.max_memory_allocated(), "allocated_before_step": before,
               "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
        torch.cuda.reset_peak_memory_stats()
        (variant.update or variant.step)()
        variant.step()
        torch.cuda.synchronize()
        return row | {"update_peak_bytes": torch.cuda.max_memory_allocated()}
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    variant.step()
    row = {"peak_bytes": _status("VmHWM"), "rss_before_step": before}
    Path("/proc/self/clear_refs").write_text("5")
    (variant.update or variant.step)()
    variant.step()
    return row | {"update_peak_bytes": _status("VmHWM")}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS | MORE_MODELS))
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--batch", type=int, default=None, help="this batch size for every model")
    parser.add_argument("--image-size", type=int, default=None, help="this image size for every model")
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    parser.add_argument("--parallel", type=int, default=1, help="variants measured at a time, each in its process")
    parser.add_argument("--quick", action="store_true", help="LeNet, dense, static and rigl: a smoke test")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "out" / "memory.json")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one, args)))
        return []
    if args.quick:
        args.models, args.variants, args.parallel = ["lenet_300_100"], ["dense", "static", "rigl"], 2
    passed = ["--device", args.device, "--autocast", args.autocast]  # what each subprocess needs to know
    passed += ["--batch", str(args.batch)] if args.batch else []
    passed += ["--image-size", str(args.image_size)] if args.image_size else []
    passed += ["--channels-last"] if args.channels_last else []

    def measure(model_name: str, label: str) -> dict:
        run = subprocess.run([sys.executable, __file__, "--one", model_name, label, *passed],
                             capture_output=True, text=True)
        row = {"model": model_name, "variant": label}
        if run.returncode:
            row["error"] = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1][:100]
        else:
            row.update(json.loads(run.stdout.strip().splitlines()[-1]))
        return row

    results = []
    for model_name in args.models:
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            results += pool.map(measure, [model_name] * len(args.variants), args.variants)
        of = {r["variant"]: r for r in results if r["model"] == model_name and "peak_bytes" in r}
        dense = of.get("dense")
        for r in of.values():
            if dense:
                r["ratio_to_dense"] = r["peak_bytes"] / dense["peak_bytes"]
                r["update_ratio_to_dense"] = r["update_peak_bytes"] / dense["update_peak_bytes"]
    rows = [[r["model"], r["variant"], *([r["error"], "", "", ""] if "error" in r else
            [f"{r['peak_bytes'] / 2**20:.0f}", f"{r['ratio_to_dense']:.3f}" if "ratio_to_dense" in r else "-",
             f"{r['update_peak_bytes'] / 2**20:.0f}",
             f"{r['update_ratio_to_dense']:.3f}" if "update_ratio_to_dense" in r else "-"])] for r in results]
    print(f"peak memory of a training step at sparsity 0.9, {machine()} ({args.device}, {args.autocast} autocast), "
          f"commit {common.commit()}")
    print(table(["model", "variant", "step peak MiB", "step x dense", "update step peak MiB", "update x dense"], rows))
    write_json(args.output, {"machine": machine(), "device": args.device, "arguments": vars(args) | {
        "output": str(args.output)}, "results": results})
    return results


if __name__ == "__main__":
    main()
