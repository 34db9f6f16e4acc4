"""Size, FLOPs and latency of `dst_prune.export(format="shrink")` against dense, after channel-level sparsity.

Models: an MLP (three Linear(width, width) and a dense 1000-way head) and a plain VGG-style CNN
(five 3x3 convs with BatchNorm and ReLU, max pools, global average pool, a dense Linear head), made
sparse with `granularity="channel"` (whole output channels, as Chase trains them: Yin et al. 2023) at
each sparsity; the CNN's stem conv and both heads stay dense (dst_prune's default). Biases and BatchNorm
statistics are random, as after training, so that pruned channels output constants that shrink has to
fold into their consumers. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` for one sample;
latencies are medians of interleaved rounds of the dense export and the shrunk one.

Each configuration of threads and machine load is timed apart (a load of `N` runs `N` busy-loop processes beside
the benchmark); only ratios within one configuration compare.

    python benchmarks/shrink.py                         # writes benchmarks/out/shrink.{json,md}
    python benchmarks/shrink.py --threads 1 2 --loads 0 2
    python benchmarks/shrink.py --quick                 # seconds: a 512-wide MLP
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
from common import commit, competing_load, interleaved, load_average, machine, table, write_json, write_markdown
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import dst_prune


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1000))


def cnn(base: int) -> nn.Module:
    layers: list[nn.Module] = []
    widths = [3, base, 2 * base, 4 * base, 4 * base, 8 * base]
    for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        if i in (1, 3, 4):
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * base, 1000))


def like_trained(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=g))
                module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                module.bias.copy_(0.1 * torch.randn(module.num_features, generator=g))
    return model


def flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers()
                                                            if n.endswith("offset_weight"))


def sample(name: str, batch: int, args: argparse.Namespace) -> torch.Tensor:
    return torch.randn((batch, args.width) if name == "mlp" else (batch, 3, args.image_size, args.image_size))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--width", type=int, default=4096, help="the MLP's width")
    parser.add_argument("--cnn-base", type=int, default=64, help="the CNN's first width (then 2x, 4x, 4x, 8x)")
    parser.add_argument("--image-size", type=int, default=64, help="the CNN's input size")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--loads", nargs="+", type=int, default=[0],
                        help="busy-loop processes competing for the cores (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a 512-wide MLP at 0.5, 2 rounds: a smoke test")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.width, args.sparsities, args.batches, args.repeats = ["mlp"], 512, [0.5], [1], 2
    configs = [(m, s) for m in args.models for s in args.sparsities]
    results = []
    for name, sparsity in tqdm(configs, desc="shrink benchmark", file=sys.stderr):
        torch.manual_seed(args.seed)
        model = like_trained(mlp(args.width) if name == "mlp" else cnn(args.cnn_base), args.seed)
        dst_prune.apply(model, sparsity=sparsity, granularity="channel", method="static", init="random",
                        seed=args.seed)
        dense, shrunk = dst_prune.export(model, format="dense"), dst_prune.export(model, format="shrink")
        check = sample(name, 2, args)
        with torch.inference_mode():
            torch.testing.assert_close(shrunk(check), dense(check), rtol=1e-4, atol=1e-4)
        size = {"params": params(shrunk), "dense_params": params(dense), "flops": flops(shrunk, sample(name, 1, args)),
                "dense_flops": flops(dense, sample(name, 1, args))}
        for batch in args.batches:
            for threads in args.threads:
                for load in args.loads:
                    torch.set_num_threads(threads)
                    with competing_load(load):
                        average = load_average()
                        samples = interleaved({"dense": dense, "shrink": shrunk}, sample(name, batch, args),
                                              args.repeats)
                    ms = {k: 1000 * statistics.median(v) for k, v in samples.items()}
                    results.append({"model": name, "sparsity": sparsity, "batch": batch, "threads": threads,
                                    "load": load, "load_average": average, **size, "dense_ms": ms["dense"],
                                    "shrink_ms": ms["shrink"], "speedup": ms["dense"] / ms["shrink"]})
    columns = ["model", "channel sparsity", "batch", "threads", "load", "params (dense -> shrink)",
               "MFLOPs per sample", "dense ms", "shrink ms", "shrink x dense"]
    rows = [[r["model"], r["sparsity"], r["batch"], r["threads"], r["load"],
             f"{r['dense_params'] / 1e6:.2f}M -> {r['params'] / 1e6:.2f}M ({r['params'] / r['dense_params']:.2f})",
             f"{r['dense_flops'] / 1e6:.4g} -> {r['flops'] / 1e6:.4g} ({r['flops'] / r['dense_flops']:.2f})",
             f"{r['dense_ms']:.2f}", f"{r['shrink_ms']:.2f}", f"{r['speedup']:.2f}x"] for r in results]
    title = (f"Shrink export, {machine(max(args.threads))}, medians of {args.repeats} interleaved rounds, commit "
             f"{commit()}")
    print(title)
    print(table(columns, rows))
    write_json(args.output_dir / "shrink.json", {"machine": machine(max(args.threads)),
                                                 "command": " ".join(["python benchmarks/shrink.py",
                                                                      *(sys.argv[1:] if argv is None else argv)]),
                                                 "repeats": args.repeats, "threads": args.threads,
                                                 "results": results})
    write_markdown(args.output_dir / "shrink.md", title, columns, rows)
    return results


if __name__ == "__main__":
    main()
