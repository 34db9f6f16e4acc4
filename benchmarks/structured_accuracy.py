"""What structure costs in accuracy: SRigL (constant fan-in) vs RigL vs static, side by side in one run.

LeNet-300-100 on MNIST (fully sparse, as in the DSR paper; distribution `erk`) at each sparsity, and a
small CNN on CIFAR-10 (JPEG; read with the project's `build_datasets`, decoded once into tensors and
cached; stem conv and head dense) at its sparsities, every method under the same steps, optimizer, learning
rate schedule and seeds. Prints test accuracy (median over seeds), the ratios SRigL / RigL and SRigL /
static, and SRigL's ablated neurons; writes JSON, Markdown and a plot into benchmarks/out/.

    DATAPATH=../shared/data python benchmarks/structured_accuracy.py          # about 12 min on 2 CPU cores
    DATAPATH=../shared/data python benchmarks/structured_accuracy.py --mnist-epochs 1 --mnist-train-images 3000 \
        --seeds 0 --sparsities 0.9 --cifar-sparsities --update-every 5       # a smoke run (~10 s)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from common import machine, table, write_json, write_markdown
from torch import nn
from tqdm import tqdm

import dst_prune
from dst_prune.compat.models import lenet_300_100
from dst_prune.training.data import load_mnist_normalized, resolve_data_root

logger = logging.getLogger("structured_accuracy")
METHODS = ["dense", "static", "rigl", "srigl"]
_DATA: dict = {}


def small_cnn() -> nn.Module:
    """Three 3x3 conv blocks (16, 32, 64 channels, max-pooled) and two Linear layers: ~0.1M weights."""
    def block(a: int, b: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 16, 128),
                         nn.ReLU(), nn.Linear(128, 10))


def cifar_tensors(root: Path, train_images: int) -> Path:
    """Decode CIFAR-10 (JPEG) once through `build_datasets` (no augmentation) into a cached float16 tensor file."""
    from torch.utils.data import DataLoader, Subset

    from dst_prune.training.datasets import build_datasets

    cache = Path(os.environ.get("DST_PRUNE_CACHE", Path.home() / ".cache" / "dst_prune"))
    path = cache / f"cifar10-jpeg-tensors-{train_images}.pt"
    if path.is_file():
        return path
    info = build_datasets("cifar10", root, img_size=32)
    info.train.transform = info.val.transform  # decoded once: the same (normalize-only) transform for both
    generator = torch.Generator().manual_seed(0)
    subset = Subset(info.train, torch.randperm(len(info.train), generator=generator)[:train_images].tolist())
    tensors = {}
    for split, dataset in (("train", subset), ("test", info.val)):
        xs, ys = [], []
        for x, y in tqdm(DataLoader(dataset, batch_size=500, num_workers=2), desc=f"decoding CIFAR-10 {split}",
                         file=sys.stderr):
            xs.append(x.half())
            ys.append(y)
        tensors[split] = (torch.cat(xs), torch.cat(ys))
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path.with_suffix(".partial"))
    os.replace(path.with_suffix(".partial"), path)
    return path


def _data(job: dict) -> tuple:
    key = (job["task"], job["data"])
    if key not in _DATA:
        if job["task"] == "mnist":
            (x_train, y_train), test = load_mnist_normalized(job["data"])
            _DATA[key] = (x_train[:job["train_images"]], y_train[:job["train_images"]]), test
        else:
            tensors = torch.load(job["data"], weights_only=True)
            _DATA[key] = tuple((x.float(), y) for x, y in (tensors["train"], tensors["test"]))
    return _DATA[key]


def train_one(job: dict) -> dict:
    """Train one (task, method, sparsity, seed) and return its test accuracy; runs in a worker process."""
    torch.set_num_threads(1)
    (x_train, y_train), (x_test, y_test) = _data(job)
    torch.manual_seed(job["seed"])
    model = lenet_300_100() if job["task"] == "mnist" else small_cnn()
    steps_per_epoch = len(y_train) // job["batch_size"]
    total_steps = steps_per_epoch * job["epochs"]
    optimizer = torch.optim.SGD(model.parameters(), lr=job["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, job["lr"], total_steps=total_steps, pct_start=0.15)
    dst = None
    if job["method"] != "dense":
        dst = dst_prune.apply(model, sparsity=job["sparsity"], method=job["method"], distribution="erk",
                              init="random", optimizer=optimizer, update_every=job["update_every"],
                              total_steps=total_steps, dense_stem_and_head=job["task"] != "mnist", seed=job["seed"])
    generator = torch.Generator().manual_seed(job["seed"])
    start = time.perf_counter()
    for _ in range(job["epochs"]):
        order = torch.randperm(len(y_train), generator=generator)[: steps_per_epoch * job["batch_size"]]
        for batch in order.split(job["batch_size"]):
            x = x_train[batch]
            if job["task"] == "cifar10":  # random horizontal flips, the one augmentation that costs nothing
                flip = torch.rand(len(batch), generator=generator) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            loss = nn.functional.cross_entropy(model(x), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if dst is not None:
                dst.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(x_test.split(1000), y_test.split(1000)))
    record = {k: job[k] for k in ("task", "method", "sparsity", "seed")}
    record.update(accuracy=correct / len(y_test), seconds=time.perf_counter() - start,
                  measured_sparsity=dst.sparsity if dst else 0.0, updates=dst.update_index if dst else 0)
    if dst is not None and job["method"] == "srigl":
        layers = {}
        for t in dst.targets:
            counts = t.mask.reshape(t.mask.shape[0], -1).sum(1)
            layers[t.name] = {"neurons": t.mask.shape[0], "active": int((counts > 0).sum()),
                              "fan_in": int(counts.max())}
        record.update(layers=layers, ablated=sum(v["neurons"] - v["active"] for v in layers.values()),
                      neurons=sum(v["neurons"] for v in layers.values()))
    return record


def summarize(results: list[dict], tasks: dict[str, list[float]]) -> tuple[list[str], list[list]]:
    """The table: one row per (task, sparsity), medians over seeds, ratios and SRigL's ablated neurons."""
    def median(task: str, method: str, sparsity: float) -> float | None:
        values = [r["accuracy"] for r in results if r["task"] == task and r["method"] == method
                  and (method == "dense" or r["sparsity"] == sparsity)]
        return statistics.median(values) if values else None

    columns = ["task", "sparsity", *[f"{m} %" for m in METHODS], "srigl / rigl", "srigl / static",
               "srigl ablated neurons", "seeds"]
    rows = []
    for task, sparsities in tasks.items():
        for sparsity in sparsities:
            accuracy = {m: median(task, m, sparsity) for m in METHODS}
            srigl = [r for r in results if r["task"] == task and r["method"] == "srigl" and r["sparsity"] == sparsity]
            ablated = f"{statistics.median(r['ablated'] for r in srigl):g} of {srigl[0]['neurons']}" if srigl else "-"
            seeds = len({r["seed"] for r in results if r["task"] == task and r["sparsity"] == sparsity})
            ratios = [f"{accuracy[a] / accuracy[b]:.4f}" if accuracy[a] and accuracy[b] else "-"
                      for a, b in (("srigl", "rigl"), ("srigl", "static"))]
            rows.append([task if task == "mnist" else "cifar10 (JPEG)", sparsity,
                         *[f"{100 * accuracy[m]:.2f}" if accuracy[m] is not None else "-" for m in METHODS],
                         *ratios, ablated, seeds])
    return columns, rows


def plot(results: list[dict], tasks: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, (task, sparsities) in zip(axes[0], tasks.items()):
        for method in METHODS:
            values = [statistics.median([r["accuracy"] for r in results if r["task"] == task and r["method"] == method
                                         and (method == "dense" or r["sparsity"] == s)] or [float("nan")])
                      for s in sparsities]
            style = {"linestyle": "--", "color": "black"} if method == "dense" else {"marker": "o"}
            axis.plot(sparsities, [100 * v for v in values], label=method, **style)
        axis.set(xlabel="sparsity", ylabel="test accuracy (%)",
                 title="LeNet-300-100 / MNIST" if task == "mnist" else "small CNN / CIFAR-10 (JPEG)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder holding MNIST/raw and cifar10-jpeg.zip (default: "
                                                     "$DATAPATH or .env)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99], help="MNIST's")
    parser.add_argument("--cifar-sparsities", nargs="*", type=float, default=[0.9], help="none: skip CIFAR-10")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="MNIST's")
    parser.add_argument("--cifar-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--mnist-epochs", type=int, default=2)
    parser.add_argument("--cifar-epochs", type=int, default=3)
    parser.add_argument("--mnist-train-images", type=int, default=60000, help="the first this many (smoke runs)")
    parser.add_argument("--cifar-train-images", type=int, default=20000, help="a fixed random subset of the 50k")
    parser.add_argument("--update-every", type=int, default=100, help="MNIST's")
    parser.add_argument("--cifar-update-every", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = resolve_data_root(args.data)
    if root is None:
        parser.error("no data: pass --data or set DATAPATH to the folder holding MNIST/raw and cifar10-jpeg.zip")
    jobs = []
    for task, sparsities, seeds, epochs, batch, every in (
            ("mnist", args.sparsities, args.seeds, args.mnist_epochs, 100, args.update_every),
            ("cifar10", args.cifar_sparsities, args.cifar_seeds, args.cifar_epochs, 128, args.cifar_update_every)):
        if not sparsities:
            continue
        data = str(root) if task == "mnist" else str(cifar_tensors(root, args.cifar_train_images))
        common = {"task": task, "data": data, "epochs": epochs, "batch_size": batch, "lr": 0.1, "update_every": every,
                  "train_images": args.mnist_train_images}
        jobs += [{**common, "method": m, "sparsity": s, "seed": seed} for seed in seeds for m in METHODS
                 for s in (sparsities if m != "dense" else [0.0])]
    jobs.sort(key=lambda j: j["task"] != "cifar10")  # the long runs first, so the two workers finish together
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(tqdm(pool.map(train_one, jobs), total=len(jobs), desc="training runs", unit="run",
                            file=sys.stderr))
    tasks = {"mnist": args.sparsities, **({"cifar10": args.cifar_sparsities} if args.cifar_sparsities else {})}
    columns, rows = summarize(results, tasks)
    title = (f"Test accuracy, medians over seeds; MNIST {args.mnist_epochs} epochs, CIFAR-10 (JPEG) "
             f"{args.cifar_epochs} epochs on {args.cifar_train_images} images; erk, update every "
             f"{args.update_every} / {args.cifar_update_every} steps; {machine()}, {args.workers} workers x 1 thread; "
             f"{time.perf_counter() - started:.0f} s")
    print(title)
    print(table(columns, rows))
    command = " ".join(["python", *sys.argv])
    write_json(args.output_dir / "structured_accuracy.json", {"machine": machine(), "command": command,
                                                              "arguments": {k: str(v) for k, v in vars(args).items()},
                                                              "runs": results})
    write_markdown(args.output_dir / "structured_accuracy.md", title, columns, rows)
    plot(results, tasks, args.output_dir / "structured_accuracy.png")
    logger.info("wrote %s/structured_accuracy.{json,md,png}", args.output_dir)
    return results


if __name__ == "__main__":
    main()
