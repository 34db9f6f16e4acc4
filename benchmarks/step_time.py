"""Training-step time of dst_prune against dense training and the peers, measured in one process.

For each model the variants are built once, warmed up, then timed in interleaved rounds (every round
runs one step of every variant, in turn), so that slow drifts of the machine hit all of them alike. The
order rotates from round to round, so every variant runs in every position equally often: four
identical dense resnet50s timed in a fixed order gave the first of each round about 1% faster than the
others on the CPU, a bias that a fixed order hands to whichever variant comes first. The table gives
the median, the min-max and the ratio to dense; "amortized" adds one topology update every 100 steps
(the methods' default period), timed separately.

    python benchmarks/step_time.py                                  # CPU: resnet18, resnet50, vit_small, LeNet
    python benchmarks/step_time.py --models lenet_300_100 --threads 1 --repeats 40
    python benchmarks/step_time.py --quick                          # seconds: LeNet only, 2 rounds
    python benchmarks/step_time.py --device cuda --autocast bf16 --batch-scale 8
    python benchmarks/step_time.py --device cuda --autocast bf16 --models resnet50 --batch 256 --image-size 224 \
        --channels-last --compile
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
from pathlib import Path

import common
import torch
from common import (
    CHANNELS,
    MODELS,
    MORE_MODELS,
    Timer,
    commit,
    competing_load,
    load_average,
    machine,
    rotated,
    summary,
    table,
    variants,
    write_json,
)
from tqdm import tqdm

logger = logging.getLogger("step_time")
DEFAULT_VARIANTS = ["dense", "static", "dsr", "set", "rigl", "snfs", "prune", "rigl-torch", "sparsimony-rigl",
                    "sparsimony-set"]


def _graphs() -> int:
    """The number of graphs torch.compile has made in this process (0 before it is first used)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure(model_name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    batch_size, size = (MODELS | MORE_MODELS)[model_name]
    batch_size = args.batch or batch_size * args.batch_scale
    size = args.image_size or size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, CHANNELS.get(model_name, 3), size, size, generator=g)
    batch = (images.to(device, memory_format=common.MEMORY_FORMAT["value"]),
             torch.randint(0, 100, (batch_size,), generator=g).to(device))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.autocast == "bf16" else \
        contextlib.nullcontext
    built, missing = {}, []
    for label, factory in variants(args.variants):
        try:
            built[label] = factory(model_name, size, device, batch, autocast)
        except ImportError as error:
            missing.append(f"{label} (not installed: {error.name})")
    if args.compile:  # in place (the hooks run inside the compiled call), so every variant's step() uses it
        torch._dynamo.reset()
        for limit in ("recompile_limit", "cache_size_limit"):  # the variants share Module._call_impl's code
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4 * len(built)))
        for variant in built.values():
            variant.model.compile(backend=args.compile_backend)
    timer, graphs = Timer(device), {}
    for label, variant in built.items():  # compiled: the graphs each variant makes while it warms up
        before = _graphs()
        for _ in range(args.warmup):
            variant.step()
        graphs[label] = _graphs() - before
    samples = {label: [] for label in built}
    order, before = list(built), _graphs()
    with competing_load(args.load):
        for round_index in tqdm(range(args.repeats), desc=f"{model_name} rounds", leave=False):
            for label in rotated(order, round_index):
                samples[label].append(timer(built[label].step))
    graphs_in_rounds = _graphs() - before  # recompiles while timed: should be none
    update_ms, update_errors = {}, {}
    for label, variant in built.items():
        if variant.update is not None:
            costs = []
            try:
                for _ in range(args.update_repeats):
                    variant.update()
                    costs.append(variant.update.seconds)
                update_ms[label] = 1000 * statistics.median(costs)
            except Exception as error:  # a peer's update failing is a result to report, not a crash
                update_errors[label] = f"{type(error).__name__}: {error}"[:120]
                logger.warning("%s %s: the topology update failed: %s", model_name, label, update_errors[label])
    dense = statistics.median(samples["dense"]) * 1000
    results = []
    for label, values in samples.items():
        row = {"model": model_name, "batch": batch_size, "image": size, "variant": label, "compiled": args.compile,
               **summary(values)}
        if args.compile:
            row |= {"graphs": graphs[label], "graphs_during_rounds": graphs_in_rounds}
        row["ratio_to_dense"] = row["median_ms"] / dense
        if label in update_ms:
            row["update_ms"] = update_ms[label]
            row["amortized_ratio"] = (row["median_ms"] + update_ms[label] / 100) / dense
        if label in update_errors:
            row["update_error"] = update_errors[label]
        results.append(row)
    for label in missing:
        results.append({"model": model_name, "variant": label, "missing": True})
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS | MORE_MODELS))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--update-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--load", type=int, default=0, help="busy-loop processes competing for the cores meanwhile")
    parser.add_argument("--quick", action="store_true", help="LeNet only, 2 rounds: a smoke test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--batch-scale", type=int, default=1, help="multiply the default batch sizes")
    parser.add_argument("--batch", type=int, default=None, help="this batch size for every model")
    parser.add_argument("--image-size", type=int, default=None, help="this image size for every model")
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant's model")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "out" / "step_time.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = ["lenet_300_100"]
        args.repeats, args.warmup, args.update_repeats = 2, 1, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.channels_last:
        common.MEMORY_FORMAT["value"] = torch.channels_last
    results = [row for name in args.models for row in measure(name, args, device)]
    rows = [[r["model"], r["variant"], *(["not installed", "", "", "", ""] if r.get("missing") else [
        f"{r['median_ms']:.1f}", f"{r['min_ms']:.0f}-{r['max_ms']:.0f}", f"{r['ratio_to_dense']:.3f}",
        f"{r['update_ms']:.1f}" if "update_ms" in r else ("failed" if "update_error" in r else ""),
        f"{r['amortized_ratio']:.3f}" if "update_ms" in r else ""])] for r in results]
    compiled = f", torch.compile ({args.compile_backend})" if args.compile else ""
    loaded = f", {args.load} competing busy processes" if args.load else ""
    print(f"training step, sparsity 0.9, {machine()}, {args.autocast} autocast{compiled}{loaded}, medians of "
          f"{args.repeats} interleaved rounds, load average {load_average()}, commit {commit()}")
    print(table(["model", "variant", "median ms", "min-max ms", "x dense", "update ms", "x dense amortized"], rows))
    write_json(args.output, {"machine": machine(), "threads": args.threads, "load": args.load,
                             "load_average": load_average(), "arguments": vars(args) | {"output": str(args.output)},
                             "results": results})
    return results


if __name__ == "__main__":
    main()
