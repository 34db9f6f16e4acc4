"""The masking kernels a training step can use, timed side by side on CPU: weights with zeros outside a bool mask.

A masked training step makes this pass twice (the weights before the forward, the gradient in the backward).
Candidates, each writing `w` in place, where possible, from the same weights and the same bool mask:

- `where`: `torch.where(mask, w, 0, out=w)`;
- `masked_fill`: `w.masked_fill_(~mask, 0)` with the inverted mask cached (a second bool tensor);
- `uint8 multiply`: `w.mul_(mask.view(torch.uint8))` (a mixed-dtype multiply);
- `float multiply`: `w.mul_(float_mask)` with a cached float copy of the mask (4 bytes per weight more, as
  `torch.nn.utils.prune` keeps; and not exact: `NaN * 0` stays NaN);
- `bit product`: dst_prune's kernel (`dst_prune._masking.masked_weight.zero_outside`): the float read as integers
  of its width times the mask as 0/1 integers, in chunks through a small buffer.

Each is checked first against `where` on weights holding NaN and inf at masked positions (`exact`: bit for bit).
Timed in interleaved rounds (every round runs each kernel once, in an order that rotates), per shape and thread
count, medians in milliseconds and the ratio to `where`.

    python benchmarks/masking_kernels.py                 # 784x300 (LeNet), 1536x384 (a ViT-S MLP), 4096x4096
    python benchmarks/masking_kernels.py --quick         # seconds: one small shape, 3 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import SPARSITY, commit, competing_load, load_average, machine, rotated, table, write_json

from dst_prune._masking.masked_weight import zero_outside

SHAPES = {"lenet 784x300": (300, 784), "vit_small mlp 1536x384": (1536, 384), "4096x4096": (4096, 4096)}


def kernels(mask: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each candidate as a function of the weights, writing them in place (state it needs cached up front)."""
    inverted = ~mask
    as_bytes = mask.view(torch.uint8)
    as_float = mask.float()
    zero = torch.zeros(())
    return {
        "where": lambda w: torch.where(mask, w, zero, out=w),
        "masked_fill": lambda w: w.masked_fill_(inverted, 0.0),
        "uint8 multiply": lambda w: w.mul_(as_bytes),
        "float multiply": lambda w: w.mul_(as_float),
        "bit product": lambda w: zero_outside(w, mask),
    }


def exact(kernel: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether `kernel` gives `where`'s result bit for bit, with NaN and inf at masked and active positions."""
    probe = weights.clone()
    flat, keep = probe.view(-1), mask.view(-1)
    outside, inside = (~keep).nonzero().view(-1)[:3], keep.nonzero().view(-1)[:2]
    flat[outside] = torch.tensor([float("nan"), float("inf"), float("-inf")])[:outside.numel()]
    flat[inside] = torch.tensor([float("nan"), float("inf")])[:inside.numel()]
    expected = torch.where(mask, probe, 0.0)
    result = kernel(probe.clone())
    return torch.equal(result.view(torch.int32), expected.view(torch.int32))


def measure(label: str, shape: tuple[int, int], threads: int, load: int, repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(shape, generator=generator)
    mask = torch.rand(shape, generator=generator) >= SPARSITY
    candidates = kernels(mask)
    exactness = {name: exact(kernel, weights, mask) for name, kernel in candidates.items()}
    work = {name: weights.clone() for name in candidates}
    torch.set_num_threads(threads)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with competing_load(load):
        average = load_average()
        for name, kernel in candidates.items():  # warm-up
            kernel(work[name])
        for round_ in range(repeats):
            for name in rotated(list(candidates), round_):
                start = time.perf_counter()
                candidates[name](work[name])
                samples[name].append(time.perf_counter() - start)
    where = statistics.median(samples["where"])
    return [{"shape": label, "weights": weights.numel(), "threads": threads, "load": load, "load_average": average,
             "kernel": name, "exact": exactness[name], "median_ms": 1000 * statistics.median(times),
             "ratio_to_where": statistics.median(times) / where, "repeats": repeats}
            for name, times in samples.items()]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--loads", nargs="+", type=int, default=[0],
                        help="busy-loop processes competing for the cores (0: none)")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--quick", action="store_true", help="LeNet's shape, 1 thread, 3 rounds: a smoke test")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "out" / "masking_kernels.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.threads, args.loads, args.repeats = ["lenet 784x300"], [1], [0], 3
    results = [row for label in args.shapes for threads in args.threads for load in args.loads
               for row in measure(label, SHAPES[label], threads, load, args.repeats)]
    print(f"masking kernels at sparsity {SPARSITY}, {machine(max(args.threads))}, medians of {args.repeats} "
          f"interleaved rounds, commit {commit()}")
    print(table(["shape", "threads", "load", "kernel", "exact", "median ms", "x where"],
                [[r["shape"], r["threads"], r["load"], r["kernel"], "yes" if r["exact"] else "no",
                  f"{r['median_ms']:.3f}", f"{r['ratio_to_where']:.2f}"] for r in results]))
    write_json(args.output, {"machine": machine(max(args.threads)),
                             "command": " ".join(["python benchmarks/masking_kernels.py",
                                                  *(sys.argv[1:] if argv is None else argv)]),
                             "arguments": vars(args) | {"output": str(args.output)}, "results": results})
    return results


if __name__ == "__main__":
    main()
