"""The seed's WRN experiment (DSR paper, sec. 4.2): WRN-28-k on CIFAR-10/100 with DSR, as a layer over train.py.

    python scripts/train_cifar_wrn.py -ds cifar10 -w 2              # WRN-28-2, 200 epochs, the paper's schedule
    python scripts/train_cifar_wrn.py -ds cifar10 -w 2 --smoke      # a few steps on real data
    python scripts/train_cifar_wrn.py -ds cifar10 -w 2 -- --method rigl --mixed-precision bf16   # extra flags

The schedule: 200 epochs of SGD with Nesterov momentum 0.9, lr 0.1 divided by 5 at epochs 60, 120 and
160, weight decay 5e-4, batch 100; DSR reallocates every 100 steps, the period doubling at epochs 25,
80 and 140, none from epoch 190; the stem conv, the 1x1 shortcuts and the classifier stay dense. The
data root comes from --data, $DATAPATH or DATAPATH= in .env (torchvision's CIFAR layout, or
cifar10-jpeg.zip for CIFAR-10).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train

SMOKE = ["--max-steps", "3", "--train-subset", "64", "--val-subset", "64", "--batch-size", "16", "--update-every", "1"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-ds", "--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    parser.add_argument("-w", "--width", type=int, default=2)
    parser.add_argument("-d", "--depth", type=int, default=28, choices=[16, 28])
    parser.add_argument("-s", "--sparsity", type=float, default=0.9)
    parser.add_argument("--data", default=None)
    parser.add_argument("--smoke", action="store_true", help="a few steps on real data, to check the set-up")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train.py flags")
    args = parser.parse_args(argv)
    command = [
        "--model", f"wrn_{args.depth}_{args.width}", "--dataset", args.dataset, "--sparsity", str(args.sparsity),
        "--method", "dsr", "--init", "random", "--exclude", "shortcut.weight", "--epochs", "200",
        "--batch-size", "100", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--nesterov",
        "--weight-decay", "5e-4", "--lr-schedule", "step", "--milestones", "60", "120", "160", "--gamma", "0.2",
        "--update-every", "100", "--double-at-epochs", "25", "80", "140", "--stop-epoch", "190",
        "--output-dir", f"runs/{args.dataset}-wrn_{args.depth}_{args.width}-dsr-{args.sparsity}",
        *(["--data", args.data] if args.data else []), *(SMOKE if args.smoke else []),
        *[a for a in args.extra if a != "--"],
    ]
    return train.main(command)


if __name__ == "__main__":
    main()
