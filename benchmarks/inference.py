"""Inference latency of exported sparse models (`dst_prune.export`) against the dense model.

CPU: `format="csr"` (sparse Linear layers as torch.sparse_csr); GPU: `format="semi_structured"` (2:4).
Models: a wide MLP (three 4096x4096 Linear layers, where CSR's savings are largest) and timm's
vit_small (Linear layers are most of its compute; convs and attention stay dense).

    python benchmarks/inference.py
    python benchmarks/inference.py --device cuda        # adds 2:4 semi-structured in float16
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import timm
import torch
from common import Timer, machine, summary, table, write_json
from torch import nn

import dst_prune


def wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096))


MODELS = {"mlp_4096x3": (wide_mlp, lambda b: torch.randn(b, 4096)),
          "vit_small": (lambda: timm.create_model("vit_small_patch16_224", num_classes=1000),
                        lambda b: torch.randn(b, 3, 224, 224))}


def latency(model: nn.Module, x: torch.Tensor, timer: Timer, repeats: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        return [timer(lambda: model(x)) for _ in range(repeats)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/inference.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, timer, results = torch.device(args.device), Timer(torch.device(args.device)), []
    for name in args.models:
        make, inputs = MODELS[name]
        for batch in args.batches:
            torch.manual_seed(0)
            dense = make().to(device).eval()
            x = inputs(batch).to(device)
            base = statistics.median(latency(dense, x, timer, args.repeats))
            results.append({"model": name, "batch": batch, "format": "dense", "sparsity": 0.0,
                            **summary(latency(dense, x, timer, args.repeats)), "ratio_to_dense": 1.0})
            for sparsity in args.sparsities:
                formats = ["csr"] if device.type == "cpu" else ["csr", "semi_structured"]
                for fmt in formats:
                    if fmt == "semi_structured" and sparsity != 0.5:
                        continue
                    sparse = make().to(device)
                    dst_prune.apply(sparse, sparsity=sparsity, method="static", dense_stem_and_head=False,
                                    init="random")
                    samples = latency(dst_prune.export(sparse, format=fmt), x, timer, args.repeats)
                    results.append({"model": name, "batch": batch, "format": fmt, "sparsity": sparsity,
                                    **summary(samples), "ratio_to_dense": statistics.median(samples) / base})
            if device.type == "cuda":  # 2:4 needs half precision and sparsity 0.5
                half = make().to(device).half().eval()
                xh = x.half()
                base_half = statistics.median(latency(half, xh, timer, args.repeats))
                sparse = make().to(device).half()
                dst_prune.apply(sparse, sparsity=0.5, method="static", granularity="2:4", dense_stem_and_head=False)
                samples = latency(dst_prune.export(sparse, format="semi_structured"), xh, timer, args.repeats)
                results.append({"model": name, "batch": batch, "format": "semi_structured fp16", "sparsity": 0.5,
                                **summary(samples), "ratio_to_dense": statistics.median(samples) / base_half})
    rows = [[r["model"], r["batch"], r["format"], r["sparsity"], f"{r['median_ms']:.3f}",
             f"{r['min_ms']:.2f}-{r['max_ms']:.2f}", f"{r['ratio_to_dense']:.3f}",
             f"{1 / r['ratio_to_dense']:.2f}x"] for r in results]
    print(f"inference latency, {machine()}, medians of {args.repeats}")
    print(table(["model", "batch", "format", "sparsity", "median ms", "min-max ms", "x dense", "speed-up"], rows))
    write_json(args.output, {"machine": machine(), "results": results})
    return results


if __name__ == "__main__":
    main()
