"""The cost of one topology update against the number of sparse weights, for each method and the peers.

The models are stacks of square Linear layers with 1M to 100M weights at sparsity 0.9, each update preceded
by a backward pass (so gradient-based methods have their dense gradient). All variants of a size are built
first and then timed in interleaved rounds (every round runs one update of each, in an order that rotates),
once per thread count and machine load asked for: a load of `N` runs `N` busy-loop processes beside the
benchmark (a shared machine). Only ratios within one configuration compare (the machine's load drifts
between configurations). Reported: the median wall time of one update, and per 25M weights. On CUDA the
clock starts and stops with the device idle (`torch.cuda.synchronize`).

    python benchmarks/reallocation.py                                   # 10M and 25M, 1 and 2 threads, quiet
    python benchmarks/reallocation.py --sizes 25 --threads 1 2 --loads 0 2
    python benchmarks/reallocation.py --sizes 10 100 --methods rigl --peers sparsimony-rigl --threads 1 --loads 2
    python benchmarks/reallocation.py --quick                           # seconds: 1M, dsr and rigl, no peers
    python benchmarks/reallocation.py --device cuda --sizes 25 100 --methods static dsr rigl
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from common import SPARSITY, clock, commit, competing_load, load_average, machine, rotated, table, write_json
from torch import nn

import dst_prune
from dst_prune.targets import find_targets

SIZES = {1: (1024, 1), 10: (1024, 10), 25: (2048, 6), 100: (2048, 24)}  # millions -> (width, layers)
METHODS = ["static", "dsr", "set", "rigl", "srigl", "snfs"]
PEERS = ["sparsimony-rigl", "rigl-torch"]


def stack(width: int, layers: int, device: torch.device | str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)


def backward(model: nn.Module, width: int) -> None:
    model(torch.randn(8, width, device=next(model.parameters()).device)).pow(2).mean().backward()


def ours(method: str, model: nn.Module, width: int) -> Callable[[], float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=SPARSITY, method=method, optimizer=optimizer, update_every=10**9,
                          total_steps=10**10, init="random", dense_stem_and_head=False)

    def update() -> float:
        dst.capture_dense_gradients()
        optimizer.zero_grad(set_to_none=True)
        backward(model, width)
        optimizer.step()
        if method == "snfs":
            dst.algorithm.after_optimizer_step(dst.step_count + 1)
        start = clock(model)
        dst.reparameterize()
        return clock(model) - start
    return update


def rigl_torch(model: nn.Module, width: int) -> Callable[[], float]:
    from rigl_torch.RigL import RigLScheduler

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = RigLScheduler(model, optimizer, dense_allocation=1 - SPARSITY, T_end=10**9, delta=10**8,
                           ignore_linear_layers=False, sparsity_distribution="uniform")

    def update() -> float:
        pruner.step = pruner.delta_T - 1
        optimizer.zero_grad(set_to_none=True)
        backward(model, width)
        start = clock(model)
        pruner._rigl_step()
        return clock(model) - start
    return update


def sparsimony(method: str, model: nn.Module, width: int) -> Callable[[], float]:
    from sparsimony.distributions.base import UniformDistribution
    from sparsimony.dst.rigl import RigL
    from sparsimony.dst.set import SET
    from sparsimony.schedulers.base import ConstantScheduler

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparsifier = {"rigl": RigL, "set": SET}[method](
        scheduler=ConstantScheduler(0.3, t_end=10**9, delta_t=10**8), distribution=UniformDistribution(),
        optimizer=optimizer, sparsity=SPARSITY)
    sparsifier.prepare(model, [{"tensor_fqn": s.name} for s in find_targets(model, dense_stem_and_head=False)])

    def update() -> float:
        optimizer.zero_grad(set_to_none=True)
        backward(model, width)
        sparsifier._step_count = 10**8 - 1
        start = clock(model)
        sparsifier.step()
        return clock(model) - start
    return update


def build(label: str, width: int, layers: int, device: str) -> Callable[[], float]:
    model = stack(width, layers, device)
    if label == "rigl-torch":
        return rigl_torch(model, width)
    if label.startswith("sparsimony-"):
        return sparsimony(label.split("-")[1], model, width)
    return ours(label, model, width)


def measure(size: int, args: argparse.Namespace) -> list[dict]:
    """Every variant of `size`, timed in interleaved rounds for each (threads, load) configuration."""
    width, layers = SIZES[size]
    weights = width * width * layers
    built, results = {}, []
    for label in [*args.methods, *args.peers]:
        try:
            built[label] = build(label, width, layers, args.device)
            built[label]()  # warm-up (first-call allocations)
        except Exception as error:  # a peer that is missing or fails is reported, not dropped
            results.append({"weights_millions": weights / 1e6, "variant": label,
                            "error": f"{type(error).__name__}: {error}"[:100]})
    for threads in args.threads:
        for load in args.loads:
            torch.set_num_threads(threads)
            samples: dict[str, list[float]] = {label: [] for label in built}
            failed: dict[str, str] = {}
            with competing_load(load):
                average = load_average()
                for round_ in range(args.repeats):
                    for label in rotated(list(built), round_):
                        if label in failed:
                            continue
                        try:
                            samples[label].append(built[label]())
                        except Exception as error:
                            failed[label] = f"{type(error).__name__}: {error}"[:100]
            for label in built:
                row = {"weights_millions": weights / 1e6, "variant": label, "threads": threads, "load": load,
                       "load_average": average}
                if label in failed:
                    row["error"] = failed[label]
                elif samples[label]:
                    median = 1000 * statistics.median(samples[label])
                    row |= {"median_ms": median, "min_ms": 1000 * min(samples[label]),
                            "ms_per_25M": median * 25e6 / weights, "repeats": len(samples[label])}
                results.append(row)
    built.clear()
    gc.collect()
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 25], choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--peers", nargs="*", default=PEERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--loads", nargs="+", type=int, default=[0],
                        help="busy-loop processes competing for the cores (0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1M weights, dsr and rigl, no peers: a smoke test")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "out" / "reallocation.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.methods, args.peers, args.repeats, args.threads = [1], ["dsr", "rigl"], [], 2, [1]
    results = [row for size in args.sizes for row in measure(size, args)]
    rows = [[f"{r['weights_millions']:.1f}M", r.get("threads", ""), r.get("load", ""), r["variant"],
             *(["-", "-", r["error"]] if "error" in r else [f"{r['median_ms']:.1f}", f"{r['ms_per_25M']:.1f}", ""])]
            for r in results]
    print(f"one topology update at sparsity {SPARSITY}, {machine(max(args.threads))} ({args.device}), medians of "
          f"{args.repeats} interleaved rounds, commit {commit()}")
    print(table(["weights", "threads", "load", "variant", "median ms", "ms per 25M", "note"], rows))
    write_json(args.output, {"machine": machine(max(args.threads)), "device": args.device,
                             "command": " ".join(["python benchmarks/reallocation.py",
                                                  *(sys.argv[1:] if argv is None else argv)]),
                             "arguments": vars(args) | {"output": str(args.output)}, "results": results})
    return results


if __name__ == "__main__":
    main()
