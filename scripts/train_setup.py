"""Building a run of `scripts/train.py`: the data, the model, its optimizer, the DST controller, the schedules."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from train_fsdp import require_process_group, reshard, shard
from train_runtime import choose_threads, ignore_stop_signals

import dst_prune
import dst_prune.optim
from dst_prune.training.checkpoints import TrainingProgress
from dst_prune.training.data import resolve_data_root
from dst_prune.training.datasets import ShardedEpochSampler, build_datasets
from dst_prune.training.models import create_model
from dst_prune.training.run_log import RunLog

__all__ = ["Run", "build_data", "build_model", "build_sharded_model", "evaluate", "lr_lambda", "make_optimizer",
           "subset"]

logger = logging.getLogger("train")


@dataclass
class Run:
    """Everything one training run works with."""

    args: argparse.Namespace
    accelerator: Accelerator
    train_set: object
    val_set: object
    sampler: ShardedEpochSampler
    loader: DataLoader
    total_steps: int
    lr_factor: Callable[[int], float]
    model_arguments: dict
    model: nn.Module = None  # as prepared by accelerate (DDP, compiled); with --fsdp, the sharded model itself
    raw_model: nn.Module = None
    optimizer: object = None
    dst: dst_prune.DynamicSparsity = None
    scheduler: object = None
    ema: object = None
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    run_log: RunLog | None = None
    running: list = field(default_factory=list)  # losses since the last log row
    saved_at: int | None = None  # the optimizer step of the last checkpoint

    @property
    def checkpoints(self) -> Path:
        return self.args.output_dir / "checkpoints"

    @property
    def state(self) -> dict:
        """What a checkpoint holds, as `save_checkpoint` / `load_checkpoint` take it."""
        return {"accelerator": self.accelerator, "model": self.raw_model, "optimizer": self.optimizer,
                "dst": self.dst, "scheduler": self.scheduler, "progress": self.progress, "ema": self.ema}


def subset(dataset, size: int | None, seed: int):
    """`size` samples of `dataset` drawn at random from `seed` (class-sorted folders make a prefix one class)."""
    if not size or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.utils.data.Subset(dataset, sorted(order.tolist()))


def lr_lambda(args: argparse.Namespace, total_steps: int, steps_per_epoch: float) -> Callable[[int], float]:
    """The LR factor at an optimizer step: linear warmup, then cosine, step or constant."""
    milestones = [round(m * steps_per_epoch) for m in args.milestones]

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step / max(1, total_steps), 1.0)))
        if args.lr_schedule == "step":
            return args.gamma ** sum(step >= m for m in milestones)
        return 1.0
    return factor


def make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer `--optimizer` names: torch's, or dst_prune.optim's compact one (`compact-*`)."""
    if args.optimizer.startswith("compact-"):
        kind = args.optimizer.removeprefix("compact-")
        extra = {"momentum": args.momentum, "nesterov": args.nesterov} if kind == "sgd" else {}
        return dst_prune.optim.create(kind, model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                      free_gradients=args.free_gradients, **extra)
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                               weight_decay=args.weight_decay)
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, accelerator: Accelerator, args: argparse.Namespace) -> dict:
    """Validation loss and accuracy over every rank's share of `dataset`."""
    model.eval()
    shard = torch.arange(accelerator.process_index, len(dataset), accelerator.num_processes)
    counted = torch.ones(len(shard), dtype=torch.bool)
    if args.fsdp:  # each forward all-gathers weights (a collective): every rank runs as many samples, padded
        padding = -(-len(dataset) // accelerator.num_processes) - len(shard)
        shard = torch.cat([shard, torch.zeros(padding, dtype=shard.dtype)])
        counted = torch.cat([counted, torch.zeros(padding, dtype=torch.bool)])
    loader = DataLoader(torch.utils.data.Subset(dataset, shard.tolist()), batch_size=256, num_workers=args.workers,
                        worker_init_fn=ignore_stop_signals)
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for batch, (x, y) in zip(counted.split(256), loader):
        x, y, batch = x.to(accelerator.device), y.to(accelerator.device), batch.to(accelerator.device)
        if args.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            out = model(x)
        if args.fsdp:
            out, y = out[batch], y[batch]  # the padding is not counted
        totals += torch.stack([nn.functional.cross_entropy(out.float(), y, reduction="sum").double(),
                               (out.argmax(1) == y).sum().double(), torch.tensor(len(y), device=y.device).double()])
    totals = accelerator.reduce(totals, "sum")
    if args.fsdp:
        reshard(model)  # the root keeps its parameters gathered after a forward without backward
    model.train()
    return {"val_loss": float(totals[0] / totals[2]), "val_accuracy": float(totals[1] / totals[2])}


def build_data(args: argparse.Namespace, accelerator: Accelerator) -> Run:
    """The run with its data: datasets, the resumable sampler and loader, the number of steps, the LR factor."""
    set_seed(args.seed)  # torch, numpy, random: the same initial weights on every rank
    info = build_datasets(args.dataset, resolve_data_root(args.data), img_size=args.img_size,
                          num_classes=args.num_classes)
    train_set, val_set = subset(info.train, args.train_subset, args.seed), subset(info.val, args.val_subset, args.seed)
    sampler = ShardedEpochSampler(len(train_set), batch_size=args.batch_size, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed),
                        worker_init_fn=ignore_stop_signals)
    steps_per_epoch = sampler.batches_per_epoch / args.grad_accum
    total_steps = args.max_steps or max(1, math.floor(args.epochs * steps_per_epoch))
    model_arguments = {"num_classes": info.num_classes, "in_chans": info.in_chans, "img_size": info.img_size,
                       **args.model_arguments}
    return Run(args, accelerator, train_set, val_set, sampler, loader, total_steps,
               lr_lambda(args, total_steps, steps_per_epoch), model_arguments)


def _apply(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dst_prune.DynamicSparsity:
    """`dst_prune.apply` with the run's flags (the schedule converted from epochs to optimizer steps)."""
    args = run.args
    steps_per_epoch = run.sampler.batches_per_epoch / args.grad_accum
    to_step = lambda epochs: max(1, round(epochs * steps_per_epoch))  # noqa: E731
    return dst_prune.apply(model, sparsity=args.sparsity, method=args.method, distribution=args.distribution,
                           init=args.init, exclude=args.exclude, dense_stem_and_head=not args.sparse_stem_and_head,
                           optimizer=optimizer, update_every=args.update_every, total_steps=run.total_steps,
                           stop_fraction=args.stop_fraction,
                           stop_step=to_step(args.stop_epoch) if args.stop_epoch is not None else None,
                           double_at=[to_step(e) for e in args.double_at_epochs] +
                           [max(1, round(f * run.total_steps)) for f in args.double_at_fractions], seed=args.seed,
                           **args.hyperparameters)


def build_model(run: Run) -> None:
    """The model, its optimizer, the DST controller, the LR schedule and the EMA, prepared by accelerate.

    With --fsdp: sharded by the script itself (`build_sharded_model`).
    """
    args, accelerator = run.args, run.accelerator
    model = create_model(args.model, pretrained=args.pretrained, **run.model_arguments)
    if args.channels_last and args.fsdp:
        logger.info("--channels-last with --fsdp: the inputs are channels-last; the weights stay contiguous, as "
                    "fully_shard requires")
    elif args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.fsdp:
        build_sharded_model(run, model)
    else:
        optimizer = make_optimizer(args, model)
        run.dst = _apply(run, model, optimizer)
        run.dst.prepare_for_ddp()
        run.raw_model = model
        if args.compile:
            model = torch.compile(model)
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, run.lr_factor)
        run.model, run.optimizer = accelerator.prepare(model, optimizer)
        run.dst.optimizer = run.optimizer
        if args.ema:
            from timm.utils import ModelEmaV3

            run.ema = ModelEmaV3(run.raw_model, decay=args.ema)
            run.dst.add_copy(run.ema.module)  # the EMA's masks follow the model's after every update
    threads = choose_threads(args.threads, accelerator.device, sum(p.numel() for p in run.raw_model.parameters()))
    if threads:
        torch.set_num_threads(threads)
        logger.info("%d CPU thread%s per process (--threads)", threads, "s" if threads > 1 else "")


def build_sharded_model(run: Run, model: nn.Module) -> None:
    """--fsdp: `dst_prune.apply` on the unsharded model, `fully_shard` per block and the root, then the optimizer
    (built on the sharded parameters) handed over to the controller, as docs/fsdp.md documents."""
    require_process_group(run.accelerator)
    model.to(run.accelerator.device)
    run.dst = _apply(run, model, None)
    names = shard(model, run.dst, run.accelerator.device)
    logger.info("fully_shard on %d blocks (%s), then the root, across %d processes", len(names),
                ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""), run.accelerator.num_processes)
    run.model = run.raw_model = model
    run.optimizer = make_optimizer(run.args, model)
    run.dst.optimizer = run.optimizer
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, run.lr_factor)
