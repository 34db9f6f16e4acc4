"""Dynamic sparse training dropped into a plain PyTorch training loop: three added lines, marked (1)-(3).

Trains LeNet-300-100 at 90% sparsity with DSR on real data that needs no download: MNIST when a data
root is set (`--data`, `$DATAPATH` or `DATAPATH=` in `.env`; torchvision's `MNIST/raw` layout), else
scikit-learn's bundled 8x8 digits. Prints the sparsity tables and the test accuracy.

    python scripts/quickstart.py                      # digits, or MNIST if DATAPATH is set
    DATAPATH=../shared/data python scripts/quickstart.py --epochs 5
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch import nn
from tqdm import tqdm

import dst_prune
from dst_prune.compat.models import lenet_300_100
from dst_prune.training.data import load_digits, load_mnist_normalized, resolve_data_root

logger = logging.getLogger("quickstart")


def load_data(root: str | None) -> tuple[str, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    data_root = resolve_data_root(root)
    if data_root is not None:
        return ("MNIST", *load_mnist_normalized(data_root))
    return ("digits (scikit-learn)", *load_digits())


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(1000), labels.split(1000)))
    model.train()
    return correct / len(labels)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="data root holding MNIST/raw (default: $DATAPATH or .env)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--method", default="dsr", choices=dst_prune.list_methods())
    parser.add_argument("--distribution", default="uniform")
    parser.add_argument("--epochs", type=int, default=None, help="default: 6 on MNIST, 40 on digits")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--update-every", type=int, default=100, help="optimizer steps between reallocations")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    name, (x_train, y_train), (x_test, y_test) = load_data(args.data)
    epochs = args.epochs or (6 if name == "MNIST" else 40)
    model = lenet_300_100(x_train[0].numel())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    # (1) make the model sparse; the controller keeps the number of non-zeros fixed while it trains
    dst = dst_prune.apply(model, sparsity=args.sparsity, method=args.method, distribution=args.distribution,
                          optimizer=optimizer, update_every=args.update_every, dense_stem_and_head=False,
                          seed=args.seed)
    logger.info("%s: %d training and %d test images; %s at sparsity %.2f", name, len(y_train), len(y_test),
                args.method, args.sparsity)

    start, step = time.perf_counter(), 0
    generator = torch.Generator().manual_seed(args.seed)
    for _ in tqdm(range(epochs), desc="epochs", unit="epoch"):
        order = torch.randperm(len(y_train), generator=generator)
        for batch in order.split(args.batch_size):
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            dst.step()  # (2) count the step; every `update_every` steps DSR reallocates the budget
            step += 1
            if args.max_steps and step >= args.max_steps:
                break
        if args.max_steps and step >= args.max_steps:
            break

    # (3) inspect the sparsity, per model and per tensor
    print(dst.sum_table)
    print(dst.stats_table)
    test_accuracy = accuracy(model, x_test, y_test)
    print(f"{name}: test accuracy {test_accuracy:.4f} at sparsity {dst.sparsity:.4f} after {step} steps, "
          f"{dst.update_index} reallocations, {time.perf_counter() - start:.1f} s")
    return test_accuracy


if __name__ == "__main__":
    main()
