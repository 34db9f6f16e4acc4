"""Accuracy of every method on LeNet-300-100 / MNIST at high sparsity, under one training budget.

Dense, static, SET, DSR, RigL, SNFS and GMP train LeNet-300-100 (fully sparse, as in the DSR paper) on
the real MNIST for the same number of steps, with the same optimizer and learning-rate schedule, at each
sparsity and seed. Prints a table of test accuracy (mean ± standard deviation over seeds) and writes it
as JSON and Markdown, with an accuracy-vs-sparsity plot.

    DATAPATH=../shared/data python benchmarks/mnist_methods.py            # the README's table (~25 min)
    DATAPATH=../shared/data python benchmarks/mnist_methods.py --epochs 1 --seeds 0 --sparsities 0.9
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from prettytable import PrettyTable
from torch import nn
from tqdm import tqdm

import dst_prune
from dst_prune.compat.models import lenet_300_100
from dst_prune.training.data import load_mnist_normalized, resolve_data_root

logger = logging.getLogger("mnist_methods")
DEFAULT_METHODS = ["dense", "static", "set", "dsr", "rigl", "snfs", "gmp"]
_DATA: dict = {}


def train_one(job: dict) -> dict:
    """Train one (method, sparsity, seed) and return its test accuracy; runs in a worker process."""
    torch.set_num_threads(1)
    if "mnist" not in _DATA:
        _DATA["mnist"] = load_mnist_normalized(job["data"])
    (x_train, y_train), (x_test, y_test) = _DATA["mnist"]
    torch.manual_seed(job["seed"])
    model = lenet_300_100()
    steps_per_epoch = len(y_train) // job["batch_size"]
    total_steps = steps_per_epoch * job["epochs"]
    optimizer = torch.optim.SGD(model.parameters(), lr=job["lr"], momentum=0.9, nesterov=True,
                                weight_decay=job["weight_decay"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    dst = None
    if job["method"] != "dense":
        # DSR's K is a fraction of all sparse weights: keep it at 10% of the active ones (the default's ratio
        # at 90% sparsity); the default would replace every active weight at each update at 99% sparsity
        scaled = job["method"] == "dsr" and job["dsr_k"] == "scaled"
        extra = {"target_fraction_to_prune": 0.1 * (1 - job["sparsity"])} if scaled else {}
        dst = dst_prune.apply(model, sparsity=job["sparsity"], method=job["method"], distribution=job["distribution"],
                              init="random", optimizer=optimizer, update_every=job["update_every"],
                              total_steps=total_steps, dense_stem_and_head=False, seed=job["seed"], **extra)
    generator = torch.Generator().manual_seed(job["seed"])
    start = time.perf_counter()
    for _ in range(job["epochs"]):
        for batch in torch.randperm(len(y_train), generator=generator)[: steps_per_epoch * job["batch_size"]].split(
                job["batch_size"]):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if dst is not None:
                dst.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(x_test.split(2000), y_test.split(2000)))
    return {**{k: job[k] for k in ("method", "sparsity", "seed")}, "accuracy": correct / len(y_test),
            "measured_sparsity": dst.sparsity if dst else 0.0, "itop": dst.history[-1]["itop"] if dst and dst.history
            else None, "seconds": time.perf_counter() - start}


def summarize(results: list[dict], methods: list[str], sparsities: list[float]) -> dict:
    cells = {}
    for method in methods:
        for sparsity in sparsities:
            accuracies = [r["accuracy"] for r in results if r["method"] == method
                          and (method == "dense" or r["sparsity"] == sparsity)]
            if accuracies:
                spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
                cells[(method, sparsity)] = (statistics.mean(accuracies), spread, len(accuracies))
    return cells


def table(cells: dict, methods: list[str], sparsities: list[float]) -> PrettyTable:
    result = PrettyTable(field_names=["method", *[f"sparsity {s}" for s in sparsities]], align="r")
    result.align["method"] = "l"
    for method in methods:
        result.add_row([method, *[f"{100 * cells[(method, s)][0]:.2f} ± {100 * cells[(method, s)][1]:.2f}"
                                  for s in sparsities]])
    return result


def markdown(report: PrettyTable) -> str:
    lines = ["| " + " | ".join(report.field_names) + " |", "|" + "---|" * len(report.field_names)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in report.rows]
    return "\n".join(lines) + "\n"


def plot(cells: dict, methods: list[str], sparsities: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        means = [100 * cells[(method, s)][0] for s in sparsities]
        spreads = [100 * cells[(method, s)][1] for s in sparsities]
        style = {"linestyle": "--", "color": "black"} if method == "dense" else {"marker": "o"}
        axis.errorbar(sparsities, means, yerr=spreads, capsize=3, label=method, **style)
    axis.set(xlabel="sparsity", ylabel="test accuracy (%)", title="LeNet-300-100 on MNIST, one training budget")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder holding MNIST/raw (default: $DATAPATH or .env)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--update-every", type=int, default=100)
    parser.add_argument("--distribution", default="erk")
    parser.add_argument("--dsr-k", choices=["scaled", "default"], default="scaled",
                        help="DSR's K: 10%% of the active weights (scaled) or target_fraction_to_prune=0.01")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = resolve_data_root(args.data)
    if data is None:
        parser.error("no MNIST: pass --data or set DATAPATH to the folder holding MNIST/raw")
    common = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "update_every",
                                            "distribution", "dsr_k")}
    jobs = [{"method": m, "sparsity": s, "seed": seed, "data": str(data), **common}
            for seed in args.seeds for m in args.methods for s in (args.sparsities if m != "dense" else [0.0])]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(tqdm(pool.map(train_one, jobs), total=len(jobs), desc="runs", unit="run"))
    cells = summarize(results, args.methods, args.sparsities)
    report = table(cells, args.methods, args.sparsities)
    print(f"LeNet-300-100 / MNIST test accuracy (%), mean ± std over seeds {args.seeds}; {args.epochs} epochs, "
          f"SGD+Nesterov lr {args.lr} cosine, distribution {args.distribution}, update every {args.update_every}")
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    from common import commit, machine  # benchmarks/common.py: this script's folder is on sys.path

    (args.output_dir / "mnist_methods.json").write_text(json.dumps({
        "machine": machine(), "commit": commit(), "arguments": {**common, "seeds": args.seeds}, "runs": results},
        indent=1))
    (args.output_dir / "mnist_methods.md").write_text(markdown(report))
    plot(cells, args.methods, args.sparsities, args.output_dir / "mnist_methods.png")
    logger.info("wrote %s/mnist_methods.{json,md,png}", args.output_dir)
    return cells


if __name__ == "__main__":
    main()
