"""Inference latency of `dst_prune.export(format="condensed")` against dense and CSR, on constant fan-in masks.

Models: a wide MLP (three Linear(width, width), 4096 by default) and timm's vit_small_patch16_224 whose
MLP blocks (`blocks[i].mlp.fc1/fc2`) are sparse with constant fan-in (everything else stays dense). The
masks are written as SRigL trains them (Lasby et al., ICLR 2024): every row keeps the same number of
inputs, at random positions. The sparsity is rounded so that the fan-in is a whole number and each
layer keeps exactly the count `dst_prune.apply` gave it. The three exports of the same sparse model are
timed in interleaved rounds (medians); "x dense" is the dense median over the format's.

Each configuration of threads and machine load is timed apart (a load of `N` runs `N` busy-loop processes beside
the benchmark: a shared machine, where multi-threaded sparse products used to collapse); only ratios within one
configuration compare.

    python benchmarks/condensed.py                      # writes benchmarks/out/condensed.{json,md}
    python benchmarks/condensed.py --models mlp --batches 1 --threads 1 2 --loads 0 2 --repeats 15
    python benchmarks/condensed.py --quick              # seconds: a 512-wide MLP
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import timm
import torch
from common import commit, competing_load, interleaved, load_average, machine, table, write_json, write_markdown
from torch import nn
from tqdm import tqdm

import dst_prune

FORMATS = ("dense", "csr", "condensed")


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width))


def constant_fan_in_(model: nn.Module, dense: dict[str, torch.Tensor], seed: int) -> list[int]:
    """Rewrite the mask of every sparse Linear of `model` to constant fan-in, keeping each layer's count.

    The weights at the new positions are the dense initialization's (`dense`: the state before `apply`).
    Returns the fan-in of each layer.
    """
    g = torch.Generator().manual_seed(seed)
    fan_ins = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not hasattr(module, "weight_mask"):
            continue
        mask = module.weight_mask
        fan_in, rest = divmod(int(mask.sum()), mask.shape[0])
        if rest:
            raise ValueError(f"{name}: {int(mask.sum())} active weights are not a whole number of rows of "
                             f"{mask.shape[0]}; pass a sparsity whose density times the fan-in is whole")
        columns = torch.rand(mask.shape, generator=g).topk(fan_in, dim=1).indices
        new = torch.zeros_like(mask).scatter_(1, columns, True)
        with torch.no_grad():
            mask.copy_(new)
            module.weight_orig.copy_(dense[f"{name}.weight"] * new)
        fan_ins.append(fan_in)
    return fan_ins


def sparse_model(name: str, sparsity: float, args: argparse.Namespace) -> tuple[nn.Module, float, list[int]]:
    torch.manual_seed(args.seed)
    if name == "mlp":
        model, include, fan_in_of = mlp(args.width), None, args.width
    else:
        model = timm.create_model("vit_small_patch16_224", img_size=args.vit_img_size, depth=args.vit_depth,
                                  num_classes=1000)
        include, fan_in_of = r"blocks\.\d+\.mlp\.fc[12]\.weight", model.embed_dim
    effective = 1 - round((1 - sparsity) * fan_in_of) / fan_in_of  # a whole fan-in in every layer
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dst_prune.apply(model, sparsity=effective, method="static", include=include, dense_stem_and_head=False)
    return model, effective, constant_fan_in_(model, dense, args.seed)


def inputs(name: str, batch: int, args: argparse.Namespace) -> torch.Tensor:
    if name == "mlp":
        return torch.randn(batch, args.width)
    return torch.randn(batch, 3, args.vit_img_size, args.vit_img_size)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "vit_small_mlp"], choices=["mlp", "vit_small_mlp"])
    parser.add_argument("--width", type=int, default=4096, help="the MLP's width")
    parser.add_argument("--vit-img-size", type=int, default=224)
    parser.add_argument("--vit-depth", type=int, default=12, help="blocks of the ViT (fewer for a quick run)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--loads", nargs="+", type=int, default=[0],
                        help="busy-loop processes competing for the cores (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a 512-wide MLP at 0.9, 2 rounds: a smoke test")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.width, args.sparsities, args.batches, args.repeats = ["mlp"], 512, [0.9], [1, 32], 2
    configs = [(m, s) for m in args.models for s in args.sparsities]
    results = []
    for name, sparsity in tqdm(configs, desc="condensed benchmark", file=sys.stderr):
        model, effective, fan_ins = sparse_model(name, sparsity, args)
        exports = {fmt: dst_prune.export(model, format=fmt) for fmt in FORMATS}
        for batch in args.batches:
            x = inputs(name, batch, args)
            with torch.inference_mode():
                torch.testing.assert_close(exports["condensed"](x), exports["dense"](x), rtol=1e-4, atol=1e-4)
            for threads in args.threads:
                for load in args.loads:
                    torch.set_num_threads(threads)
                    with competing_load(load):
                        average = load_average()
                        samples = interleaved(exports, x, args.repeats)
                    ms = {fmt: 1000 * statistics.median(v) for fmt, v in samples.items()}
                    results.append({"model": name, "batch": batch, "threads": threads, "load": load,
                                    "load_average": average, "sparsity": sparsity, "effective_sparsity": effective,
                                    "fan_in": sorted(set(fan_ins)), **{f"{fmt}_ms": ms[fmt] for fmt in FORMATS},
                                    **{f"{fmt}_min_ms": 1000 * min(samples[fmt]) for fmt in FORMATS},
                                    "csr_speedup": ms["dense"] / ms["csr"],
                                    "condensed_speedup": ms["dense"] / ms["condensed"],
                                    "condensed_vs_csr": ms["csr"] / ms["condensed"]})
    columns = ["model", "batch", "threads", "load", "sparsity", "fan-in", "dense ms", "csr ms", "condensed ms",
               "csr x dense", "condensed x dense", "condensed x csr"]
    rows = [[r["model"], r["batch"], r["threads"], r["load"], f"{r['effective_sparsity']:.4f}",
             "/".join(map(str, r["fan_in"])), f"{r['dense_ms']:.2f}", f"{r['csr_ms']:.2f}", f"{r['condensed_ms']:.2f}",
             f"{r['csr_speedup']:.2f}x", f"{r['condensed_speedup']:.2f}x", f"{r['condensed_vs_csr']:.2f}x"]
            for r in results]
    title = (f"Inference latency, {machine(max(args.threads))}, medians of {args.repeats} interleaved rounds, commit "
             f"{commit()}")
    print(title)
    print(table(columns, rows))
    write_json(args.output_dir / "condensed.json", {"machine": machine(max(args.threads)),
                                                    "command": " ".join(["python benchmarks/condensed.py",
                                                                         *(sys.argv[1:] if argv is None else argv)]),
                                                    "repeats": args.repeats, "threads": args.threads,
                                                    "results": results})
    write_markdown(args.output_dir / "condensed.md", title, columns, rows)
    return results


if __name__ == "__main__":
    main()
