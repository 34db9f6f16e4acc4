"""A short RigL run in the shape of accelerate's `complete_cv_example.py`, with the dst_prune lines of the docs.

    accelerate launch --multi_gpu --num_processes 2 tests/workers/accelerate_resume.py OUT_DIR \
        [--resume_from_checkpoint OUT_DIR/step_8]

Saves the state every 8 steps (`OUT_DIR/step_<n>`); at the end each process writes its weights and masks to
`OUT_DIR/<straight|resumed>-rank<r>.pt` and what it counted to `...-rank<r>.json`. A resumed run also tries two
damaged copies of its checkpoint (no controller file, a truncated one) and records each refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader, TensorDataset

import dst_prune
from dst_prune.integrations import accelerate as dst_accelerate

CONFIG = {"lr": 0.05, "num_epochs": 3, "seed": 42, "batch_size": 4, "checkpointing_steps": 8}


def make_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 4))


def training_function(config: dict, args: argparse.Namespace) -> None:
    accelerator = Accelerator(cpu=True)
    num_epochs, batch_size = config["num_epochs"], config["batch_size"]
    data = torch.Generator().manual_seed(config["seed"])
    images, labels = torch.randn(48, 3, 6, 6, generator=data), torch.randint(0, 4, (48,), generator=data)
    train_dataloader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)

    # a resumed run starts from other weights: load_state must bring back every one of them
    torch.manual_seed(config["seed"] + (1 if args.resume_from_checkpoint else 0))
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"] / 25, momentum=0.9)
    lr_scheduler = OneCycleLR(optimizer=optimizer, max_lr=config["lr"], epochs=num_epochs,
                              steps_per_epoch=len(train_dataloader))
    steps_before_prepare = dst_accelerate.total_steps(accelerator, train_dataloader, num_epochs)
    dst = dst_prune.apply(model, sparsity=0.8, method="rigl", optimizer=optimizer, update_every=2,
                          total_steps=steps_before_prepare, dense_stem_and_head=False)
    dst.prepare_for_ddp()
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    dst_accelerate.register(accelerator, dst)
    steps_after_prepare = dst_accelerate.total_steps(accelerator, train_dataloader, num_epochs)

    overall_step, starting_epoch, resume_step = 0, 0, None
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)
        resume_step = int(os.path.basename(args.resume_from_checkpoint).replace("step_", ""))
        starting_epoch = resume_step // len(train_dataloader)
        resume_step -= starting_epoch * len(train_dataloader)

    for epoch in range(starting_epoch, num_epochs):
        model.train()
        if args.resume_from_checkpoint and epoch == starting_epoch and resume_step is not None:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
            overall_step += resume_step + starting_epoch * len(train_dataloader)
        else:
            active_dataloader = train_dataloader
        for inputs, targets in active_dataloader:
            loss = nn.functional.cross_entropy(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            dst.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            overall_step += 1
            if overall_step % config["checkpointing_steps"] == 0:
                accelerator.save_state(os.path.join(args.output_dir, f"step_{overall_step}"))

    tag = "resumed" if args.resume_from_checkpoint else "straight"
    rank = accelerator.process_index
    unwrapped = accelerator.unwrap_model(model)
    torch.save({"weights": unwrapped.state_dict(), "masks": dict(dst.masks())},
               Path(args.output_dir, f"{tag}-rank{rank}.pt"))
    report = {"steps_before_prepare": steps_before_prepare, "steps_after_prepare": steps_after_prepare,
              "step_count": dst.step_count, "overall_step": overall_step, "updates": dst.update_index,
              "in_sync": dst.check_sync()}
    if args.resume_from_checkpoint:
        report["refusals"] = damaged_copies(accelerator, unwrapped, dst, Path(args.resume_from_checkpoint))
    Path(args.output_dir, f"{tag}-rank{rank}.json").write_text(json.dumps(report))
    accelerator.end_training()


def damaged_copies(accelerator: Accelerator, model: nn.Module, dst, checkpoint: Path) -> dict:
    """load_state of copies of `checkpoint` without / with a truncated controller file: the messages, and whether
    the model and the controller stayed exactly as they were."""
    damages = {"missing": lambda path: path.unlink(),
               "truncated": lambda path: path.write_bytes(path.read_bytes()[:99])}
    results = {}
    for name, damage in damages.items():
        copy = checkpoint.with_name(f"{checkpoint.name}-{name}")
        if accelerator.is_main_process:
            shutil.copytree(checkpoint, copy)
            damage(copy / dst_accelerate.CONTROLLER_FILE)
        accelerator.wait_for_everyone()
        before = ({k: v.clone() for k, v in model.state_dict().items()}, dst.state_dict())
        try:
            accelerator.load_state(str(copy))
            results[name] = {"error": None}
        except dst_prune.DSTError as error:
            weights, state = model.state_dict(), dst.state_dict()
            unchanged = all(torch.equal(before[0][k], v) for k, v in weights.items()) and \
                all(before[1][k] == state[k] for k in ("masks_digest", "step_count", "update_index"))
            results[name] = {"error": str(error), "unchanged": unchanged}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--resume_from_checkpoint", default=None)
    training_function(CONFIG, parser.parse_args())


if __name__ == "__main__":
    main()
