"""FSDP2 reallocation cost: time of one topology update and peak memory per rank at 1, 2 and 4 processes.

    python benchmarks/fsdp_memory.py                                  # 1, 2, 4 processes, CPU/gloo, 8.4M weights
    python benchmarks/fsdp_memory.py --width 2048 --layers 24         # 100M sparse weights
    python benchmarks/fsdp_memory.py --device cuda --processes 1 2 4  # NCCL, one GPU per process

Each process count is one `torchrun --standalone` of this script (`--worker`): a stack of `--layers` square
`Linear` layers, all sparse (`--sparsity`), `dst_prune.apply`, then `fully_shard` per layer and on the root,
Adam handed over with `dst.optimizer`. After two training steps it times `--repeats` reallocations
(`dst.reparameterize()`, after a backward that captured the dense gradient for RigL) and records, per rank,
the most bytes of gathered full tensors (masks and one layer of weights) the update held at once
(`dst.last_gathered_bytes`, counted by dst_prune), and the peak memory of one reallocation above what the rank
held before it: on CUDA `max_memory_allocated` after `reset_peak_memory_stats`; on CPU the peak resident set
(`VmHWM`, reset through `/proc/self/clear_refs`), which only sees pages the allocator had not cached before (it
can read 0). At 1 process the same model without `fully_shard` is the baseline. It also reports what dst_prune keeps
per rank at rest (mask shards and ever-active bits) against a replicated full mask. Results: JSON and
markdown under `benchmarks/out/` (ignored by git); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _rss_peak_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dst_prune
    from dst_prune.distributed.fsdp import local_tensor

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    results = {}
    variants = [(m, True) for m in args.methods] + ([(m, False) for m in args.methods] if world == 1 else [])
    for method, shard in variants:
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers))).to(device)
        dst = dst_prune.apply(model, sparsity=args.sparsity, method=method, update_every=10**9, total_steps=10**9,
                              dense_stem_and_head=False, init="random", decay="constant")
        if shard:
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        dst.optimizer = optimizer
        x = torch.randn(args.batch, args.width, device=device, generator=None)

        def backward(model: nn.Module = model, x: torch.Tensor = x) -> None:
            model(x).square().mean().backward()

        for _ in range(2):
            optimizer.zero_grad()
            backward()
            optimizer.step()
            dst.step()
        times, peaks = [], []
        for _ in range(args.repeats):
            dst.capture_dense_gradients()
            optimizer.zero_grad()
            backward()
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                _reset_rss_peak()
                before = _rss_mb()
            start = time.perf_counter()
            dst.reparameterize()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if cuda:
                peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
            else:
                peak = _rss_peak_mb()
                peaks.append(None if peak is None or before is None else peak - before)
        dst.check_sync()
        local = sum(t.buffer_mask.numel() for t in dst.targets)
        results[method if shard else f"{method} (no FSDP)"] = {
            "update_ms": [1000 * t for t in times], "update_peak_mb": peaks,
            "gathered_mb": dst.last_gathered_bytes / 2**20,
            "mask_shard_mb": local / 2**20, "ever_active_mb": sum(e.numel() for e in dst.ever_active) / 2**20,
            "full_mask_mb": dst.n_sparse / 2**20, "weight_shard_mb": sum(
                local_tensor(t.param).numel() * t.param.element_size() for t in dst.targets) / 2**20,
            "rss_mb": _rss_mb() if not cuda else torch.cuda.memory_allocated() / 2**20}
        del model, dst, optimizer
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "results": results}))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--methods", nargs="+", default=["set", "rigl"])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "out" / "fsdp_memory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    from common import machine, table, write_json

    rows, runs = [], []
    for world in args.processes:
        out = args.output_dir / f"world{world}"
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                   __file__, "--worker", "--out", str(out), "--methods", *args.methods, "--width", str(args.width),
                   "--layers", str(args.layers), "--sparsity", str(args.sparsity), "--batch", str(args.batch),
                   "--repeats", str(args.repeats), "--device", args.device]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run(command, check=True, env=env)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
        runs.append({"world": world, "ranks": ranks})
        for method in ranks[0]["results"]:
            per_rank = [r["results"][method] for r in ranks]
            update = max(statistics.median(p["update_ms"]) for p in per_rank)
            peaks = [max(v for v in p["update_peak_mb"] if v is not None) if any(
                v is not None for v in p["update_peak_mb"]) else float("nan") for p in per_rank]
            first = per_rank[0]
            rows.append([method, world, f"{update:.1f}", f"{max(p['gathered_mb'] for p in per_rank):.1f}",
                         f"{max(peaks):.1f}",
                         f"{max(p['weight_shard_mb'] for p in per_rank):.1f}",
                         f"{max(p['mask_shard_mb'] for p in per_rank):.2f}", f"{first['full_mask_mb']:.2f}",
                         f"{first['ever_active_mb']:.2f}"])
    columns = ["method", "processes", "update ms (max rank, median)", "gathered MB held (max rank)",
               "RSS peak MB above start (max rank)",
               "weight shard MB", "mask shard MB", "replicated mask MB", "ever-active MB"]
    result = table(columns, rows)
    n = args.width * args.width * args.layers
    print(f"FSDP2 reallocation, {n / 1e6:.1f}M sparse weights at sparsity {args.sparsity}, {machine()}")
    print(result)
    payload = {"machine": machine(), "device": args.device, "sparse_weights": n, "arguments": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows, "runs": runs}
    write_json(args.output_dir / "fsdp_memory.json", payload)
    markdown = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"] + [
        f"| {' | '.join(map(str, row))} |" for row in rows]
    (args.output_dir / "fsdp_memory.md").write_text(
        f"{n / 1e6:.1f}M sparse weights, sparsity {args.sparsity}, {machine()}\n\n" + "\n".join(markdown) + "\n")
    return payload


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
