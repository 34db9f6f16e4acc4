"""The seed's spatial-bottleneck experiment: CIFAR ResNets whose blocks mask their first activation.

    python scripts/train_cifar_resnet.py -ds cifar10 -d 20 -sb structured -q 1     # Peng et al.'s SB ResNet-20
    python scripts/train_cifar_resnet.py -ds cifar10 -d 20 -sb dynamic -q 2 --smoke

A comparison of the spatial bottleneck (Peng et al. 2018, `structured`: a checkerboard keeping 1/4,
1/2 or 3/4 of the positions, q = 1, 2, 3) against random spatial masks of the same density, fixed
(`static`) or redrawn every step (`dynamic`). The weights stay dense unless `-s` gives a sparsity
(then DSR, as in train.py). He et al.'s CIFAR schedule: 164 epochs of SGD momentum 0.9, lr 0.1 divided
by 10 at epochs 82 and 123, weight decay 1e-4, batch 128.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train
from train_cifar_wrn import SMOKE


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-ds", "--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    parser.add_argument("-d", "--depth", type=int, choices=[20, 32, 44, 56, 110], default=20)
    parser.add_argument("-sb", "--spatial-bottleneck", choices=["structured", "static", "dynamic", "none"],
                        default="structured")
    parser.add_argument("-q", type=int, choices=[1, 2, 3], default=1, help="keep 0.25 * q of the positions")
    parser.add_argument("-s", "--sparsity", type=float, default=0.0, help="weight sparsity (0: dense weights)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--smoke", action="store_true", help="a few steps on real data, to check the set-up")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train.py flags")
    args = parser.parse_args(argv)
    sb = [] if args.spatial_bottleneck == "none" else [
        "--model-kwargs", f"sb_mode={args.spatial_bottleneck}", "--model-kwargs", f"sb_q={args.q}"]
    command = [
        "--model", f"cifar_resnet{args.depth}", *sb, "--dataset", args.dataset, "--sparsity", str(args.sparsity),
        "--method", "dsr" if args.sparsity else "static", "--init", "random", "--epochs", "164",
        "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "1e-4",
        "--lr-schedule", "step", "--milestones", "82", "123", "--gamma", "0.1",
        "--output-dir", f"runs/{args.dataset}-resnet{args.depth}-sb_{args.spatial_bottleneck}_q{args.q}",
        *(["--data", args.data] if args.data else []), *(SMOKE if args.smoke else []),
        *[a for a in args.extra if a != "--"],
    ]
    return train.main(command)


if __name__ == "__main__":
    main()
