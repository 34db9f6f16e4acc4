"""The cost of one topology update against the number of sparse weights, for each method and the peers.

The models are stacks of square Linear layers with 1M to 100M+ weights at sparsity 0.9, each update
preceded by a backward pass (so gradient-based methods have their dense gradient). Reported: the median
wall time of one update, and per 25M weights (the issue's unit). On CUDA the clock starts and stops with the
device idle (`torch.cuda.synchronize`), so an update is timed to the end of its last kernel.

    python benchmarks/reallocation.py
    python benchmarks/reallocation.py --sizes 1 10 --methods dsr rigl
    python benchmarks/reallocation.py --device cuda --sizes 25 100 --methods static dsr rigl --peers
"""

from __future__ import annotations

import argparse
import gc
import statistics
from pathlib import Path

import torch
from common import SPARSITY, clock, machine, table, write_json
from torch import nn

import dst_prune
from dst_prune.targets import find_targets

SIZES = {1: (1024, 1), 10: (1024, 10), 25: (2048, 6), 100: (2048, 24)}  # millions -> (width, layers)


def stack(width: int, layers: int, device: torch.device | str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)


def backward(model: nn.Module, width: int) -> None:
    model(torch.randn(8, width, device=next(model.parameters()).device)).pow(2).mean().backward()


def ours(method: str, model: nn.Module, width: int):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=SPARSITY, method=method, optimizer=optimizer, update_every=10**9,
                          total_steps=10**10, init="random", dense_stem_and_head=False)

    def update() -> float:
        dst.capture_dense_gradients()
        backward(model, width)
        optimizer.step()
        if method == "snfs":
            dst.algorithm.after_optimizer_step(dst.step_count + 1)
        start = clock(model)
        dst.reparameterize()
        return clock(model) - start
    return update


def rigl_torch(model: nn.Module, width: int):
    from rigl_torch.RigL import RigLScheduler

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = RigLScheduler(model, optimizer, dense_allocation=1 - SPARSITY, T_end=10**9, delta=10**8,
                           ignore_linear_layers=False, sparsity_distribution="uniform")

    def update() -> float:
        pruner.step = pruner.delta_T - 1
        backward(model, width)
        start = clock(model)
        pruner._rigl_step()
        return clock(model) - start
    return update


def sparsimony(method: str, model: nn.Module, width: int):
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
        backward(model, width)
        sparsifier._step_count = 10**8 - 1
        start = clock(model)
        sparsifier.step()
        return clock(model) - start
    return update


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=["static", "dsr", "set", "rigl", "snfs", "gmp"])
    parser.add_argument("--peers", nargs="*", default=["rigl-torch", "sparsimony-rigl", "sparsimony-set"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "out" / "reallocation.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for size in args.sizes:
        width, layers = SIZES[size]
        for label in [*args.methods, *args.peers]:
            model = stack(width, layers, args.device)
            try:
                if label == "rigl-torch":
                    update = rigl_torch(model, width)
                elif label.startswith("sparsimony-"):
                    update = sparsimony(label.split("-")[1], model, width)
                else:
                    update = ours(label, model, width)
                costs = [update() for _ in range(args.repeats)]
                median = 1000 * statistics.median(costs)
                results.append({"weights_millions": width * width * layers / 1e6, "variant": label,
                                "median_ms": median, "min_ms": 1000 * min(costs),
                                "ms_per_25M": median * 25e6 / (width * width * layers)})
            except Exception as error:  # a peer that is missing or fails is reported, not dropped
                results.append({"weights_millions": width * width * layers / 1e6, "variant": label,
                                "error": f"{type(error).__name__}: {error}"[:100]})
            del model
            gc.collect()
    rows = [[f"{r['weights_millions']:.1f}M", r["variant"], *(["-", "-", r["error"]] if "error" in r else
            [f"{r['median_ms']:.1f}", f"{r['ms_per_25M']:.1f}", ""])] for r in results]
    print(f"one topology update at sparsity {SPARSITY}, {machine()} ({args.device}), medians of {args.repeats}")
    print(table(["weights", "variant", "median ms", "ms per 25M", "note"], rows))
    write_json(args.output, {"machine": machine(), "device": args.device, "arguments": vars(args) | {
        "output": str(args.output)}, "results": results})
    return results


if __name__ == "__main__":
    main()
