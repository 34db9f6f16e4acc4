"""The command line of `scripts/train.py`: every flag, validated when parsed (a bad value is a usage error)."""

from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path

import dst_prune
from dst_prune.integrations.datasets import DATASETS

__all__ = ["parse_args"]


def _bounded(kind: type, low: float, what: str, strict: bool = False):
    """An argparse type: a `kind` number >= low (> low with `strict`), else a clear usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (value > low if strict else value >= low) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


POSITIVE = _bounded(int, 1, "a positive integer")
NON_NEGATIVE = _bounded(int, 0, "a non-negative integer")
POSITIVE_FLOAT = _bounded(float, 0, "a positive number", strict=True)


def _fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = _bounded(float, 0, "a number in [0, 1)")(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1)")
    return value


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. drop_fraction=0.3)")
    return key.strip(), _literal(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Dynamic sparse training of a timm / torchvision model with accelerate.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lenet_300_100", help="timm name, tv:<torchvision name>, or lenet_300_100")
    p.add_argument("--pretrained", action="store_true", help="start from pretrained weights (from local caches)")
    p.add_argument("--model-kwargs", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="passed to the model's constructor, e.g. --model-kwargs sb_mode=structured")
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data", default=None, help="data root (default: $DATAPATH, else DATAPATH= in .env)")
    p.add_argument("--img-size", type=POSITIVE, default=None)
    p.add_argument("--num-classes", type=POSITIVE, default=None, help="synthetic data only")
    p.add_argument("--train-subset", type=POSITIVE, default=None, help="use N training samples (a seeded subset)")
    p.add_argument("--val-subset", type=POSITIVE, default=None, help="use N validation samples (a seeded subset)")
    g = p.add_argument_group("sparsity")
    g.add_argument("--sparsity", type=_fraction, default=0.9)
    g.add_argument("--method", default="dsr", choices=dst_prune.list_methods())
    g.add_argument("--distribution", default="uniform", choices=["uniform", "er", "erk", "global"])
    g.add_argument("--init", default="magnitude", choices=["magnitude", "random"])
    g.add_argument("--sparse-stem-and-head", action="store_true", help="make the stem and classifier sparse too")
    g.add_argument("--exclude", nargs="*", default=None, help="parameter names (or .-suffixes) to keep dense")
    g.add_argument("--update-every", type=POSITIVE, default=100, help="optimizer steps between reallocations")
    g.add_argument("--double-at-epochs", type=POSITIVE_FLOAT, nargs="*", default=(),
                   help="epochs where the period doubles")
    g.add_argument("--stop-epoch", type=POSITIVE_FLOAT, default=None, help="no reallocation from this epoch on")
    g.add_argument("--stop-fraction", type=POSITIVE_FLOAT, default=None, help="... or from this fraction of training")
    g.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="a hyperparameter of the method, e.g. --hp drop_fraction=0.3 --hp decay=cosine")
    g.add_argument("--check-sync", action="store_true", help="compare a mask digest across ranks at every update")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=POSITIVE_FLOAT, default=30)
    o.add_argument("--max-steps", type=POSITIVE, default=None, help="stop after this many optimizer steps")
    o.add_argument("--batch-size", type=POSITIVE, default=32, help="per process and micro-batch")
    o.add_argument("--grad-accum", type=POSITIVE, default=1, help="micro-batches per optimizer step")
    o.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    o.add_argument("--lr", type=POSITIVE_FLOAT, default=0.1)
    o.add_argument("--momentum", type=_bounded(float, 0, "a number >= 0"), default=0.9)
    o.add_argument("--nesterov", action="store_true")
    o.add_argument("--weight-decay", type=_bounded(float, 0, "a number >= 0"), default=5e-4)
    o.add_argument("--lr-schedule", default="cosine", choices=["cosine", "step", "constant"])
    o.add_argument("--milestones", type=POSITIVE_FLOAT, nargs="*", default=(),
                   help="epochs where a step schedule decays")
    o.add_argument("--gamma", type=POSITIVE_FLOAT, default=0.2, help="decay factor of the step schedule")
    o.add_argument("--warmup-steps", type=NON_NEGATIVE, default=0)
    o.add_argument("--clip-grad", type=POSITIVE_FLOAT, default=None)
    o.add_argument("--ema", type=_fraction, default=0.0,
                   help="timm ModelEmaV3 decay in [0, 1) (0: no EMA)")
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", type=Path, default=None)
    r.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    r.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds checkpoints")
    r.add_argument("--checkpoint-every", type=POSITIVE, default=None, help="optimizer steps (default: every epoch)")
    r.add_argument("--keep-checkpoints", type=POSITIVE, default=2)
    r.add_argument("--log-every", type=POSITIVE, default=20)
    r.add_argument("--seed", type=NON_NEGATIVE, default=0)
    r.add_argument("--cpu", action="store_true", help="run on the CPU (gloo for multi-process); the default when "
                   "no GPU is available")
    r.add_argument("--dist-timeout", type=POSITIVE_FLOAT, default=1800.0,
                   help="seconds a rank waits for the others in a collective before the run fails")
    r.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    r.add_argument("--channels-last", action="store_true")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--workers", type=NON_NEGATIVE, default=0, help="data-loading processes")
    args = p.parse_args(argv)
    args.hyperparameters, args.model_arguments = dict(args.hp), dict(args.model_kwargs)
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"{args.dataset}-{args.model.replace(':', '_')}-{args.method}-{args.sparsity}"
    return args


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
