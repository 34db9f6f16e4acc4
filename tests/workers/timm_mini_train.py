"""A small training script in the shape of timm's task-based `train.py` (1.0.27+), with the dst_prune lines of
`docs/examples/timm_train.patch` at the same places: the parser's group, `dst_timm.apply` after the optimizer,
`dst_timm.resume` before `resume_task_checkpoint`, `track_ema` after `task.setup_ema`, `SparseCheckpointSaver`,
`set_total_steps` after `create_scheduler_v2`, and `dst` into `train_one_epoch`. timm's own pieces throughout:
`create_model`, `ClassificationTask`, `create_optimizer_v2`, the task's `ModelEmaV3`, `CheckpointSaver`,
`create_scheduler_v2`, `resume_task_checkpoint`, `load_task_ema_checkpoint`.

    python tests/workers/timm_mini_train.py --output OUT [--resume OUT/checkpoint-0.pth.tar]

The data are synthetic batches drawn from a generator seeded by the epoch, so a resumed run sees the batches the
uninterrupted one saw.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
from torch import nn

from dst_prune.integrations import timm as dst_timm

parser = argparse.ArgumentParser(description="a train.py-shaped script, trained sparse")
group = parser.add_argument_group("Model parameters")
group.add_argument("--model", default="test_resnet")
group.add_argument("--num-classes", type=int, default=10)
group.add_argument("--batch-size", type=int, default=4)
group.add_argument("--batches-per-epoch", type=int, default=4)
group.add_argument("--epochs", type=int, default=2)
group.add_argument("--lr", type=float, default=0.05)
group.add_argument("--resume", default="")
group.add_argument("--output", default="")
group.add_argument("--seed", type=int, default=0)
group = parser.add_argument_group("Model exponential moving average parameters")
group.add_argument("--model-ema", action="store_true", default=True)
group.add_argument("--model-ema-decay", type=float, default=0.9)
group = parser.add_argument_group('Dynamic sparse training (dst_prune)')
group.add_argument('--sparsity', type=float, default=0.9, help='fraction of zeros in the sparse layers')
group.add_argument('--sparse-method', default='rigl', help='dst_prune method: rigl, set, dsr, snfs, ...')
group.add_argument('--sparse-update-every', type=int, default=100, help='optimizer updates between reallocations')


def batches(args: argparse.Namespace, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + epoch)
    return [(torch.randn(args.batch_size, 3, 32, 32, generator=generator),
             torch.randint(0, args.num_classes, (args.batch_size,), generator=generator))
            for _ in range(args.batches_per_epoch)]


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the live objects for inspection."""
    args = parser.parse_args(argv)
    os.makedirs(args.output or ".", exist_ok=True)
    torch.manual_seed(args.seed)
    model = create_model(args.model, pretrained=False, num_classes=args.num_classes)
    task = ClassificationTask(model=model, criterion=nn.CrossEntropyLoss(), verbose=False)
    model = task.get_trainable_module()
    optimizer = create_optimizer_v2(model, opt="sgd", lr=args.lr, momentum=0.9, weight_decay=1e-4)
    dst = dst_timm.apply(model, optimizer=optimizer, sparsity=args.sparsity, method=args.sparse_method,
                         update_every=args.sparse_update_every)  # before resume, EMA and DDP

    # optionally resume from a checkpoint
    resume_epoch = None
    if args.resume:
        dst_timm.resume(dst, args.resume)  # checks the checkpoint and restores the masks before timm loads it
        resume_epoch = resume_task_checkpoint(task, args.resume, optimizer=optimizer, log_info=False)

    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
        dst_timm.track_ema(dst, task)  # the EMA copy follows the masks

    saver = dst_timm.SparseCheckpointSaver(  # stores the controller's state in every checkpoint
        dst,
        model=model,
        optimizer=optimizer,
        args=args,
        checkpoint_dir=args.output,
        recovery_dir=args.output,
        max_history=args.epochs,
        task=task,
    )

    updates_per_epoch = args.batches_per_epoch
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                                   warmup_epochs=0, updates_per_epoch=updates_per_epoch)
    dst.set_total_steps(num_epochs * updates_per_epoch)  # the optimizer updates of the whole run
    start_epoch = resume_epoch if resume_epoch is not None else 0
    if start_epoch > 0:
        lr_scheduler.step(start_epoch)

    for epoch in range(start_epoch, num_epochs):
        loss = train_one_epoch(
            epoch,
            model,
            batches(args, epoch),
            optimizer,
            args,
            task=task,
            dst=dst,
            lr_scheduler=lr_scheduler,
        )
        saver.save_checkpoint(epoch, metric=-loss)
        lr_scheduler.step(epoch + 1, -loss)
    return {"dst": dst, "task": task, "model": model, "optimizer": optimizer, "epochs": num_epochs}


def train_one_epoch(
        epoch,
        model,
        loader,
        optimizer,
        args,
        task=None,
        dst=None,
        lr_scheduler=None,
):
    task.get_trainable_module().train()
    num_updates = epoch * len(loader)
    optimizer.zero_grad()
    total = 0.0
    for input, target in loader:
        loss = task(input, target)["loss"]
        loss.backward()
        optimizer.step()
        total += loss.item()

        num_updates += 1
        optimizer.zero_grad()
        dst_timm.step(dst)  # counts the update; reallocates when the schedule says so
        task.update_ema(step=num_updates)
        for target_tensor in dst.targets:  # (a check of this script: the EMA is zero outside the masks)
            ema = task.get_trainable_module(ema=True).module.get_submodule(target_tensor.module_name)
            if ema.weight_orig[~target_tensor.mask].any():
                raise AssertionError(f"{target_tensor.name}: the EMA is non-zero outside the mask")
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
    return total / len(loader)


if __name__ == "__main__":
    main(sys.argv[1:])
