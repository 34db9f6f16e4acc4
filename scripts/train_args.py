"""The command line of `scripts/train.py`: every flag, validated when parsed (a bad value is a usage error).

`python scripts/train.py --help` lists every flag with its default. `run_args` is what a checkpoint saves
(`args.json`) so that a resumed run can compare its flags with the checkpoint's (`train_resume.py`).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from pathlib import Path

from train_fsdp import check_fsdp_flags

import dst_prune
from dst_prune.training.datasets import DATASETS

__all__ = ["DEFAULT_SCHEDULES", "build_parser", "parse_args", "run_args"]

MAX_EPOCHS = 1e6  # larger epoch counts overflow the step arithmetic (and no run is that long)
MAX_TIMEOUT = 1e8  # seconds (three years); larger ones overflow the process group's clock
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
#: the reallocation schedule the script gives a method when no flag sets one, in fractions of training. DSR: the DSR
#: paper's LeNet-300-100 recipe (the period doubling at epochs 25, 50 and 75, no reallocation from epoch 90 of 100),
#: so that no weight is regrown (at zero) once the learning rate is too small to grow it. The library's DSR default
#: (`dst_prune.apply`) has no such schedule: it reallocates every `update_every` steps to the end.
DEFAULT_SCHEDULES = {"dsr": {"stop_fraction": 0.9, "double_at_fractions": [0.25, 0.5, 0.75]}}


def _bounded(kind: type, low: float, what: str, strict: bool = False, high: float | None = None):
    """An argparse type: a `kind` number >= low (> low with `strict`) and <= high, else a clear usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (value > low if strict else value >= low) or (kind is float and not math.isfinite(value)) or \
                (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


POSITIVE = _bounded(int, 1, "a positive integer")
NON_NEGATIVE = _bounded(int, 0, "a non-negative integer")
POSITIVE_FLOAT = _bounded(float, 0, "a positive number", strict=True)
EPOCHS = _bounded(float, 0, f"a positive number of epochs (at most {MAX_EPOCHS:g})", strict=True, high=MAX_EPOCHS)
SEED = _bounded(int, 0, f"a seed in [0, {MAX_SEED}] (2**32 - 1)", high=MAX_SEED)
TIMEOUT = _bounded(float, 0, f"a positive number of seconds (at most {MAX_TIMEOUT:g})", strict=True, high=MAX_TIMEOUT)


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


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, once: flags whose default needs words say it in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            shown = "off"
        elif action.default in ((), []):
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Dynamic sparse training of a timm / torchvision model with accelerate.",
                                formatter_class=_HelpFormatter)
    p.add_argument("--model", default="lenet_300_100", help="timm name, tv:<torchvision name>, or lenet_300_100")
    p.add_argument("--pretrained", action="store_true", help="start from pretrained weights (from local caches)")
    p.add_argument("--model-kwargs", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="passed to the model's constructor, e.g. --model-kwargs sb_mode=structured")
    p.add_argument("--dataset", default="digits", choices=DATASETS, help="what to train on")
    p.add_argument("--data", default=None, help="data root (default: $DATAPATH, else DATAPATH= in ./.env)")
    p.add_argument("--img-size", type=POSITIVE, default=None, help="image size (default: the dataset's)")
    p.add_argument("--num-classes", type=POSITIVE, default=None, help="classes of --dataset synthetic (default: 10)")
    p.add_argument("--train-subset", type=POSITIVE, default=None,
                   help="use N training samples, a seeded subset (default: all)")
    p.add_argument("--val-subset", type=POSITIVE, default=None,
                   help="use N validation samples, a seeded subset (default: all)")
    g = p.add_argument_group("sparsity")
    g.add_argument("--sparsity", type=_fraction, default=0.9, help="fraction of zeros among the sparse weights")
    g.add_argument("--method", default="dsr", choices=dst_prune.list_methods(), help="the DST algorithm")
    g.add_argument("--distribution", default="uniform", choices=["uniform", "er", "erk", "global"],
                   help="how the budget is split across layers")
    g.add_argument("--init", default="magnitude", choices=["magnitude", "random"], help="the initial mask")
    g.add_argument("--sparse-stem-and-head", action="store_true", help="make the stem and classifier sparse too")
    g.add_argument("--exclude", nargs="*", default=None,
                   help="parameter names (or .-suffixes) to keep dense (default: none)")
    g.add_argument("--update-every", type=POSITIVE, default=100, help="optimizer steps between reallocations")
    g.add_argument("--double-at-epochs", type=EPOCHS, nargs="*", default=None,
                   help="epochs where the period doubles; none with no value (default: none; for dsr, at 25%%, 50%% "
                        "and 75%% of training, as the DSR paper's LeNet-300-100 recipe)")
    g.add_argument("--stop-epoch", type=EPOCHS, default=None,
                   help="no reallocation from this epoch on (default: see --stop-fraction)")
    g.add_argument("--stop-fraction", type=_bounded(float, 0, "a number in (0, 1]", strict=True, high=1.0),
                   default=None,
                   help="no reallocation from this fraction of training on (default: 0.9 for dsr, as the DSR "
                        "paper's LeNet-300-100 recipe; the method's own for the others: rigl, srigl, gmp, granet "
                        "0.75, snfs 1.0, set and static never)")
    g.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="a hyperparameter of the method, e.g. --hp drop_fraction=0.3 --hp decay=cosine "
                        "(default: the method's)")
    g.add_argument("--check-sync", action="store_true", help="compare a mask digest across ranks at every update")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=EPOCHS, default=30, help="length of training")
    o.add_argument("--max-steps", type=POSITIVE, default=None,
                   help="stop after this many optimizer steps (default: --epochs)")
    o.add_argument("--batch-size", type=POSITIVE, default=32, help="per process and micro-batch")
    o.add_argument("--grad-accum", type=POSITIVE, default=1, help="micro-batches per optimizer step")
    o.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                   help="the optimizer: torch's, or dst_prune.optim's (compact-*), whose state covers the active "
                        "weights of sparse layers only (less memory, the same results)")
    o.add_argument("--free-gradients", action="store_true",
                   help="with a compact-* optimizer: step each parameter inside backward and free its gradient at "
                        "once (one process, no --grad-accum, --clip-grad or fp16)")
    o.add_argument("--lr", type=POSITIVE_FLOAT, default=0.1, help="learning rate")
    o.add_argument("--momentum", type=_bounded(float, 0, "a number >= 0"), default=0.9, help="SGD momentum")
    o.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    o.add_argument("--weight-decay", type=_bounded(float, 0, "a number >= 0"), default=5e-4, help="weight decay")
    o.add_argument("--lr-schedule", default="cosine", choices=["cosine", "step", "constant"], help="LR schedule")
    o.add_argument("--milestones", type=EPOCHS, nargs="*", default=(), help="epochs where a step schedule decays")
    o.add_argument("--gamma", type=POSITIVE_FLOAT, default=0.2, help="decay factor of the step schedule")
    o.add_argument("--warmup-steps", type=NON_NEGATIVE, default=0, help="linear LR warmup, in optimizer steps")
    o.add_argument("--clip-grad", type=POSITIVE_FLOAT, default=None, help="clip the gradient norm (default: no)")
    o.add_argument("--ema", type=_fraction, default=0.0, help="timm ModelEmaV3 decay in [0, 1); 0: no EMA")
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", type=Path, default=None,
                   help="where the outputs go (default: runs/<dataset>-<model>-<method>-<sparsity>)")
    r.add_argument("--resume", default=None,
                   help="'latest' (the newest checkpoint in --output-dir) or a checkpoint folder (default: start "
                        "a new run)")
    r.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds checkpoints")
    r.add_argument("--checkpoint-every", type=POSITIVE, default=None,
                   help="optimizer steps between checkpoints (default: every epoch)")
    r.add_argument("--keep-checkpoints", type=POSITIVE, default=2, help="how many of the newest checkpoints to keep")
    r.add_argument("--log-every", type=POSITIVE, default=20, help="optimizer steps between log rows")
    r.add_argument("--seed", type=SEED, default=0, help="seeds the weights, the data order and every mask draw")
    r.add_argument("--fsdp", action="store_true",
                   help="shard the model across the processes with FSDP2 (fully_shard per block, then the root) "
                        "instead of DDP; launch with torchrun or accelerate launch (see docs/fsdp.md)")
    r.add_argument("--cpu", action="store_true",
                   help="run on the CPU (gloo for multi-process) even when a GPU is available; without one, the run "
                        "is on the CPU anyway")
    r.add_argument("--threads", type=POSITIVE, default=None,
                   help="CPU threads per process (default: 1 for models under 1M parameters on the CPU, where more "
                        "threads only add overhead; else torch's, or $OMP_NUM_THREADS when set)")
    r.add_argument("--dist-timeout", type=TIMEOUT, default=1800.0,
                   help="seconds a rank waits for the others in a collective before the run fails")
    r.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="autocast dtype")
    r.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--workers", type=NON_NEGATIVE, default=0, help="data-loading processes")
    return p


def _check_output_dir(parser: argparse.ArgumentParser, path: Path) -> None:
    """Refuse an --output-dir that is a file, or lies below one."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                parser.error(f"argument --output-dir: {folder} is a file, not a folder; choose another --output-dir")
            return


OPTIMIZERS = ["sgd", "adam", "adamw", "compact-sgd", "compact-adam", "compact-adamw"]


def _check_optimizer_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for what dst_prune.optim cannot do (it would refuse the same at construction)."""
    compact = args.optimizer.startswith("compact-")
    if compact and args.fsdp:
        parser.error(f"--optimizer {args.optimizer} keeps compact state of whole parameters; FSDP2's sharded "
                     f"parameters need torch's optimizers: pass --optimizer {args.optimizer.removeprefix('compact-')}")
    if args.free_gradients and not compact:
        parser.error(f"--free-gradients needs a compact-* optimizer (it is dst_prune.optim's); received --optimizer "
                     f"{args.optimizer}")
    if args.free_gradients:
        conflicts = [flag for flag, on in (("--grad-accum", args.grad_accum > 1), ("--clip-grad", args.clip_grad),
                                           ("--mixed-precision fp16", args.mixed_precision == "fp16")) if on]
        if conflicts:
            parser.error(f"--free-gradients frees each gradient as soon as it is applied, so {', '.join(conflicts)} "
                         f"(which read or keep gradients) cannot run with it; drop one of them")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite starts it afresh: pass one of them")
    args.hyperparameters, args.model_arguments = dict(args.hp), dict(args.model_kwargs)
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"{args.dataset}-{args.model.replace(':', '_')}-{args.method}-{args.sparsity}"
    _check_output_dir(parser, args.output_dir)
    check_fsdp_flags(parser, args)
    _check_optimizer_flags(parser, args)
    schedule = DEFAULT_SCHEDULES.get(args.method, {})
    if args.stop_fraction is None and args.stop_epoch is None:
        args.stop_fraction = schedule.get("stop_fraction")
    args.double_at_fractions = schedule.get("double_at_fractions", []) if args.double_at_epochs is None else []
    args.double_at_epochs = args.double_at_epochs or []
    return args


def run_args(args: argparse.Namespace, processes: int) -> dict:
    """The flags as plain JSON values (what a checkpoint saves as `args.json`), with the number of processes.

    Where the run is and how it was started (`--output-dir`, `--resume`, `--overwrite`) are left out: a
    checkpoint's contents do not depend on them.
    """
    skip = {"hyperparameters", "model_arguments",  # derived from --hp and --model-kwargs
            "output_dir", "resume", "overwrite"}
    values = {key: value for key, value in vars(args).items() if key not in skip}
    for key in ("hp", "model_kwargs"):
        values[key] = dict(values[key])
    return json.loads(json.dumps({**values, "processes": processes}, default=repr))  # tuples as lists


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
