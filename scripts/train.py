"""Dynamic sparse training of any timm / torchvision model with accelerate: one GPU, many, or the CPU.

    python scripts/train.py                                   # LeNet-300-100 on bundled digits, DSR at 90%
    accelerate launch scripts/train.py --model resnet50 --dataset imagefolder --data /imagenet --method rigl
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --cpu ...   # 2-process DDP on a CPU

Masks agree on every rank by construction (checked with --check-sync), reallocation counts optimizer
steps (not micro-batches, not fp16-skipped steps), and a run resumed from any checkpoint (--resume)
ends bitwise where the uninterrupted run does. Checkpoints hold only tensors and plain values
(`dst_prune.integrations.checkpoints`). The flags are in `train_args.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import sys
import time

import safetensors.torch
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from train_args import parse_args

import dst_prune
from dst_prune.distributed.ddp import mask_digest
from dst_prune.integrations.checkpoints import TrainingProgress, find_checkpoint, load_checkpoint, save_checkpoint
from dst_prune.integrations.data import resolve_data_root
from dst_prune.integrations.datasets import ShardedEpochSampler, build_datasets
from dst_prune.integrations.models import create_model
from dst_prune.integrations.plots import density_heatmap
from dst_prune.integrations.run_log import RunLog

logger = logging.getLogger("train")


def subset(dataset, size: int | None, seed: int):
    """`size` samples of `dataset` drawn at random from `seed` (class-sorted folders make a prefix one class)."""
    if not size or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.utils.data.Subset(dataset, sorted(order.tolist()))


def lr_lambda(args: argparse.Namespace, total_steps: int, steps_per_epoch: float):
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
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                               weight_decay=args.weight_decay)
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, accelerator: Accelerator, args: argparse.Namespace) -> dict:
    model.eval()
    shard = torch.arange(accelerator.process_index, len(dataset), accelerator.num_processes)
    loader = DataLoader(torch.utils.data.Subset(dataset, shard.tolist()), batch_size=256, num_workers=args.workers)
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for x, y in loader:
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        if args.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            out = model(x)
        totals += torch.stack([nn.functional.cross_entropy(out.float(), y, reduction="sum").double(),
                               (out.argmax(1) == y).sum().double(), torch.tensor(len(y), device=y.device).double()])
    totals = accelerator.reduce(totals, "sum")
    model.train()
    return {"val_loss": float(totals[0] / totals[2]), "val_accuracy": float(totals[1] / totals[2])}


def _accelerator(args) -> Accelerator:
    """On the CPU when asked or when there is no GPU; collectives time out after --dist-timeout seconds."""
    cpu = args.cpu or not torch.cuda.is_available()
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.dist_timeout))
    return Accelerator(cpu=cpu, mixed_precision=args.mixed_precision, kwargs_handlers=[timeout])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = _accelerator(args)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if not args.cpu and not torch.cuda.is_available():
        logger.info("no CUDA GPU found: training on the CPU (as with --cpu)")
    try:
        return train(args, accelerator)
    except (RuntimeError, torch.distributed.DistBackendError) as error:
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            raise
        logger.error("rank %d: another rank did not answer within --dist-timeout=%g s (it stopped, hung or crashed); "
                     "stopping this run. Resume it with --resume latest.", accelerator.process_index, args.dist_timeout)
        sys.exit(3)


def train(args, accelerator: Accelerator) -> dict:
    checkpoints = args.output_dir / "checkpoints"
    checkpoint = find_checkpoint(args.resume, checkpoints) if args.resume else None
    if checkpoint is None and not args.overwrite and (checkpoints / "latest").is_file():
        raise SystemExit(f"{args.output_dir} holds checkpoints of an earlier run: pass --resume latest to continue it, "
                         f"--overwrite to start afresh there, or another --output-dir.")
    set_seed(args.seed)  # torch, numpy, random: the same initial weights on every rank
    info = build_datasets(args.dataset, resolve_data_root(args.data), img_size=args.img_size,
                          num_classes=args.num_classes)
    train_set, val_set = subset(info.train, args.train_subset, args.seed), subset(info.val, args.val_subset, args.seed)
    sampler = ShardedEpochSampler(len(train_set), batch_size=args.batch_size, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = sampler.batches_per_epoch / args.grad_accum
    total_steps = args.max_steps or max(1, math.floor(args.epochs * steps_per_epoch))

    model_arguments = {"num_classes": info.num_classes, "in_chans": info.in_chans, "img_size": info.img_size,
                       **args.model_arguments}
    model = create_model(args.model, pretrained=args.pretrained, **model_arguments)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(args, model)
    to_step = lambda epochs: max(1, round(epochs * steps_per_epoch))  # noqa: E731
    dst = dst_prune.apply(model, sparsity=args.sparsity, method=args.method, distribution=args.distribution,
                          init=args.init, exclude=args.exclude, dense_stem_and_head=not args.sparse_stem_and_head,
                          optimizer=optimizer, update_every=args.update_every, total_steps=total_steps,
                          stop_fraction=args.stop_fraction,
                          stop_step=to_step(args.stop_epoch) if args.stop_epoch is not None else None,
                          double_at=[to_step(e) for e in args.double_at_epochs], seed=args.seed,
                          **args.hyperparameters)
    dst.prepare_for_ddp()
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_steps, steps_per_epoch))
    model, optimizer = accelerator.prepare(model, optimizer)
    dst.optimizer = optimizer
    progress = TrainingProgress()
    ema = None
    if args.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(raw_model, decay=args.ema)
        dst.add_copy(ema.module)  # the EMA's masks follow the model's after every update
    state = {"accelerator": accelerator, "model": raw_model, "optimizer": optimizer, "dst": dst,
             "scheduler": scheduler, "progress": progress, "ema": ema}
    if checkpoint is not None:
        load_checkpoint(checkpoint, **state)
        logger.info("resumed from %s at epoch %d, batch %d, step %d", checkpoint, progress.epoch, progress.batch,
                    progress.optimizer_steps)
    run_log = RunLog(args.output_dir, enabled=accelerator.is_main_process,
                     resume_step=progress.optimizer_steps if checkpoint is not None else None)
    saved_at = [progress.optimizer_steps if checkpoint is not None else None]

    def save() -> None:
        progress.unlogged_losses = [float(v) for v in running]  # so a resumed run logs the same rows
        save_checkpoint(checkpoints, progress.optimizer_steps, keep=args.keep_checkpoints, **state)
        saved_at[0] = progress.optimizer_steps

    logger.info("%s on %s: %d tensors sparse at %.4f (%s, %s), %d optimizer steps of %d x %d x %d samples",
                args.model, args.dataset, len(dst.targets), dst.sparsity, args.method, args.distribution,
                total_steps, args.batch_size, args.grad_accum, accelerator.num_processes)

    start = time.perf_counter()
    running = [torch.tensor(v, device=accelerator.device) for v in progress.unlogged_losses]
    interactive = sys.stderr.isatty()  # into a log file: a line every 30 s, not a carriage return per step
    bar = tqdm(total=total_steps, initial=progress.optimizer_steps, disable=not accelerator.is_main_process,
               desc="train", unit="step", dynamic_ncols=interactive, file=sys.stderr,
               mininterval=0.1 if interactive else 30.0, maxinterval=10.0 if interactive else 60.0)
    while progress.optimizer_steps < total_steps:
        sampler.set_epoch(progress.epoch, skip_batches=progress.batch)
        for x, y in loader:
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            if args.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = (progress.micro_batches + 1) % args.grad_accum == 0
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss / args.grad_accum)
            progress.micro_batches += 1
            progress.batch += 1
            running.append(loss.detach())
            if not sync:
                continue
            if args.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.optimizer_steps += 1
            updated = dst.step(skipped=accelerator.optimizer_step_was_skipped)
            if updated and args.check_sync:
                dst.check_sync()
            if ema is not None:
                ema.update(raw_model, step=progress.optimizer_steps)
            bar.update(1)
            if progress.optimizer_steps % args.log_every == 0 or updated:
                record = dst.history[-1] if dst.history else {}
                values = {"loss": float(torch.stack(running).mean()), "lr": scheduler.get_last_lr()[0],
                          "sparsity": dst.sparsity, "epoch": progress.epoch,
                          **{k: record[k] for k in ("threshold", "churn", "itop", "drop_fraction") if k in record}}
                running.clear()
                run_log.log("train", progress.optimizer_steps, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", sparsity=f"{values['sparsity']:.4f}", refresh=interactive)
            if args.checkpoint_every and progress.optimizer_steps % args.checkpoint_every == 0:
                save()
            if progress.optimizer_steps >= total_steps:
                break
        else:  # the epoch ended
            progress.epoch, progress.batch = progress.epoch + 1, 0
            run_log.log("val", progress.optimizer_steps, {"epoch": progress.epoch,
                                                            **evaluate(model, val_set, accelerator, args)})
            if not args.checkpoint_every:
                save()
    bar.close()
    if saved_at[0] != progress.optimizer_steps:
        save()  # the final state, unless the loop just saved it
    return finish(args, accelerator, model, raw_model, dst, ema, val_set, progress, run_log, start, model_arguments)


def finish(args, accelerator, model, raw_model, dst, ema, val_set, progress, run_log, start,
           model_arguments: dict) -> dict:
    """Final evaluation, tables, plots, and the model files: plain weights and the controller's state."""
    summary = {"steps": progress.optimizer_steps, "updates": dst.update_index, "sparsity": dst.sparsity,
               "seconds": time.perf_counter() - start, **evaluate(model, val_set, accelerator, args)}
    if ema is not None:
        summary["ema_val_accuracy"] = evaluate(ema.module, val_set, accelerator, args)["val_accuracy"]
    summary["model"] = {"name": args.model, **model_arguments}  # what create_model needs to rebuild it
    ranks = args.output_dir / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    weights = float(sum(p.detach().double().abs().sum() for p in raw_model.parameters()))
    (ranks / f"rank{accelerator.process_index}.json").write_text(json.dumps(
        {"mask_digest": mask_digest(dst.targets), "weights_abs_sum": weights, "steps": dst.step_count,
         "updates": dst.update_index, "micro_batches": progress.micro_batches}))
    if accelerator.is_main_process:
        out = args.output_dir
        (out / "sum_table.txt").write_text(f"{dst.sum_table}\n")
        (out / "stats_table.txt").write_text(f"{dst.stats_table}\n")
        if dst.history:
            dst.save_history(out / "history.csv")
            dst.plot_history(out / "density.png")
            density_heatmap(dst, out / "density_heatmap.png")  # one named row per layer, for many layers
        safetensors.torch.save_model(raw_model, str(out / "model.safetensors"))  # plain: loads anywhere
        torch.save(dst.state_dict(), out / "dst_state.pt")  # the masks, for dst_prune.load_sparse_state_dict
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(dst.sum_table)
        print(dst.stats_table)
        print(f"{args.model} on {args.dataset}: validation accuracy {summary['val_accuracy']:.4f} at sparsity "
              f"{dst.sparsity:.4f} ({args.method}) after {progress.optimizer_steps} steps, {dst.update_index} "
              f"reallocations; outputs in {out}")
    run_log.close()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
