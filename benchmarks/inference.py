"""Inference latency of exported sparse models (`dst_prune.export`) against the dense model.

CPU: `format="csr"` (sparse Linear layers as torch.sparse_csr); GPU: `format="semi_structured"` (2:4, against
the dense model in the same half precision). Models: a wide MLP (three 4096x4096 Linear layers, where CSR's
savings are largest), timm's vit_small and vit_base (Linear layers are most of their compute; convs and attention
stay dense, and for 2:4 the classifier head too: its 1000 rows are not a multiple of the kernels' 32), and
vit_base's twelve MLP blocks alone (768 -> 3072 -> 768 on 197 tokens per image).

Each configuration of threads and machine load is timed apart, the dense model and its exports interleaved (a
load of `N` runs `N` busy-loop processes beside the benchmark).

    python benchmarks/inference.py
    python benchmarks/inference.py --models mlp_4096x3 --threads 1 2 --loads 0 2
    python benchmarks/inference.py --quick               # seconds
    python benchmarks/inference.py --device cuda        # adds 2:4 semi-structured in float16
    python benchmarks/inference.py --device cuda --models vit_base_mlp --batches 256 --formats semi_structured \
        --half-dtypes float16 bfloat16
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import timm
import torch
from common import Timer, commit, competing_load, interleaved, load_average, machine, summary, table, write_json
from timm.layers import Mlp
from torch import nn

import dst_prune


def wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096))


def vit_base_mlp() -> nn.Module:
    """The MLP blocks of vit_base_patch16_224, one after the other (norms, attention and residuals left out)."""
    return nn.Sequential(*[Mlp(768, 3072) for _ in range(12)])


MODELS = {"mlp_4096x3": (wide_mlp, lambda b: torch.randn(b, 4096)),
          "vit_small": (lambda: timm.create_model("vit_small_patch16_224", num_classes=1000),
                        lambda b: torch.randn(b, 3, 224, 224)),
          "vit_base": (lambda: timm.create_model("vit_base_patch16_224", num_classes=1000),
                       lambda b: torch.randn(b, 3, 224, 224)),
          "vit_base_mlp": (vit_base_mlp, lambda b: torch.randn(b, 197, 768))}
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def latency(model: nn.Module, x: torch.Tensor, timer: Timer, repeats: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        return [timer(lambda: model(x)) for _ in range(repeats)]


def two_four(name: str, batch: int, x: torch.Tensor, dtype: torch.dtype, timer: Timer, repeats: int) -> list[dict]:
    """The dense model in `dtype` against its 2:4 export (sparsity 0.5, magnitude masks), on the same inputs."""
    make, _ = MODELS[name]
    label = str(dtype).removeprefix("torch.")
    torch.manual_seed(0)
    half = make().to(x.device, dtype).eval()
    x = x.to(dtype)
    dense = latency(half, x, timer, repeats)
    base = statistics.median(dense)
    del half
    torch.manual_seed(0)
    sparse = make().to(x.device, dtype)
    dst_prune.apply(sparse, sparsity=0.5, method="static", granularity="2:4",
                    dense_stem_and_head=name.startswith("vit_") and not name.endswith("_mlp"))
    samples = latency(dst_prune.export(sparse, format="semi_structured"), x, timer, repeats)
    return [{"model": name, "batch": batch, "format": f"dense {label}", "sparsity": 0.0, **summary(dense),
             "ratio_to_dense": 1.0},
            {"model": name, "batch": batch, "format": f"semi_structured {label}", "sparsity": 0.5,
             **summary(samples), "ratio_to_dense": statistics.median(samples) / base}]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--loads", nargs="+", type=int, default=[0],
                        help="busy-loop processes competing for the cores (0: none)")
    parser.add_argument("--quick", action="store_true", help="the 4096 MLP at 0.9, batch 1, 2 rounds: a smoke test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--formats", nargs="+", choices=["csr", "semi_structured"], default=None,
                        help="default: csr on CPU, csr and semi_structured on CUDA")
    parser.add_argument("--half-dtypes", nargs="+", choices=list(HALF), default=["float16"],
                        help="the precisions of the 2:4 runs (semi_structured)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "out" / "inference.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.sparsities, args.batches, args.repeats, args.threads = ["mlp_4096x3"], [0.9], [1], 2, [1]
    device, timer, results = torch.device(args.device), Timer(torch.device(args.device)), []
    formats = args.formats or (["csr"] if device.type == "cpu" else ["csr", "semi_structured"])
    if "semi_structured" in formats and device.type != "cuda":
        parser.error("--formats semi_structured needs --device cuda (2:4 kernels run on NVIDIA GPUs)")
    for name in args.models:
        make, inputs = MODELS[name]
        if "csr" in formats:  # the dense model and its CSR exports, interleaved, per threads and load
            torch.manual_seed(0)
            exports = {("dense", 0.0): make().to(device).eval()}
            for sparsity in args.sparsities:
                torch.manual_seed(0)
                sparse = make().to(device)
                dst_prune.apply(sparse, sparsity=sparsity, method="static", dense_stem_and_head=False, init="random")
                exports[("csr", sparsity)] = dst_prune.export(sparse, format="csr")
            calls = {f"{fmt} {sparsity}": model for (fmt, sparsity), model in exports.items()}
            for batch in args.batches:
                torch.manual_seed(0)
                x = inputs(batch).to(device)
                for threads in args.threads:
                    for load in args.loads:
                        torch.set_num_threads(threads)
                        with competing_load(load):
                            average = load_average()
                            samples = interleaved(calls, x, args.repeats, timer=timer)
                        base = statistics.median(samples["dense 0.0"])
                        results += [{"model": name, "batch": batch, "threads": threads, "load": load,
                                     "load_average": average, "format": fmt, "sparsity": sparsity,
                                     **summary(samples[f"{fmt} {sparsity}"]),
                                     "ratio_to_dense": statistics.median(samples[f"{fmt} {sparsity}"]) / base}
                                    for fmt, sparsity in exports]
        for batch in args.batches if "semi_structured" in formats else []:
            torch.manual_seed(0)
            x = inputs(batch).to(device)
            for dtype_name in args.half_dtypes:
                results += two_four(name, batch, x, HALF[dtype_name], timer, args.repeats)
    rows = [[r["model"], r["batch"], r.get("threads", ""), r.get("load", ""), r["format"], r["sparsity"],
             f"{r['median_ms']:.3f}", f"{r['min_ms']:.2f}-{r['max_ms']:.2f}", f"{r['ratio_to_dense']:.3f}",
             f"{1 / r['ratio_to_dense']:.2f}x"] for r in results]
    print(f"inference latency, {machine(max(args.threads))}, medians of {args.repeats} interleaved rounds, commit "
          f"{commit()}")
    print(table(["model", "batch", "threads", "load", "format", "sparsity", "median ms", "min-max ms", "x dense",
                 "speed-up"], rows))
    write_json(args.output, {"machine": machine(max(args.threads)), "device": args.device, "arguments": vars(args) | {
        "output": str(args.output)}, "results": results})
    return results


if __name__ == "__main__":
    main()
