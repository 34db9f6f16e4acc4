"""Dynamic sparse training of any timm / torchvision model with accelerate: one GPU, many, or the CPU.

    python scripts/train.py                                   # LeNet-300-100 on bundled digits, DSR at 90%
    accelerate launch scripts/train.py --model resnet50 --dataset imagefolder --data /imagenet --method rigl
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --cpu ...   # 2-process DDP on a CPU
    torchrun --standalone --nproc_per_node 2 scripts/train.py --fsdp --cpu ...   # sharded (FSDP2), `train_fsdp.py`

Masks agree on every rank by construction (checked with --check-sync), reallocation counts optimizer
steps (not micro-batches, not fp16-skipped steps), and a run resumed from any checkpoint (--resume)
ends bitwise where the uninterrupted run does. Checkpoints hold only tensors and plain values
(`dst_prune.training.checkpoints`) and are taken only between optimizer steps: with --grad-accum,
an epoch that ends inside an accumulation cycle is checkpointed after that cycle's optimizer step.
Ctrl-C or SIGTERM saves a checkpoint at the next optimizer step and prints the command that resumes.
The flags are in `train_args.py`; which of them may change on resume, in `train_resume.py`; --fsdp's sharding and
checkpoints, in `train_fsdp.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
import train_fsdp
from accelerate import Accelerator, InitProcessGroupKwargs
from torch import nn
from train_args import parse_args, run_args
from train_resume import apply_optimizer_flags, compare_flags
from train_runtime import ProgressReport, StopRequest, resume_command
from train_setup import Run, build_data, build_model, evaluate

import dst_prune
from dst_prune.distributed import mask_digest
from dst_prune.training import checkpoints as ckpt
from dst_prune.training.plots import density_heatmap
from dst_prune.training.run_log import RunLog

logger = logging.getLogger("train")


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
        return train(args, accelerator, sys.argv[1:] if argv is None else argv)
    except dst_prune.DSTError as error:
        raise SystemExit(f"train.py: {error}") from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: no traceback
        print(f"train.py: interrupted; nothing was saved since the last checkpoint in {args.output_dir / 'checkpoints'}"
              f" (if any).", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except (RuntimeError, torch.distributed.DistBackendError) as error:
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            raise
        logger.error("rank %d: another rank did not answer within --dist-timeout=%g s (it stopped, hung or crashed); "
                     "stopping this run. Resume it with --resume latest.", accelerator.process_index, args.dist_timeout)
        sys.exit(3)


def checkpoint_to_resume(args: argparse.Namespace, accelerator: Accelerator) -> tuple[Path | None, list[str]]:
    """The checkpoint `--resume` names and the flags that changed since (refusing those that define the run)."""
    checkpoints = args.output_dir / "checkpoints"
    if not args.resume:
        if not args.overwrite and (checkpoints / "latest").is_file():
            raise SystemExit(f"{args.output_dir} holds checkpoints of an earlier run: pass --resume latest to continue "
                             f"it, --overwrite to start afresh there, or another --output-dir.")
        return None, []
    checkpoint = (train_fsdp.find_sharded_checkpoint if args.fsdp else ckpt.find_checkpoint)(args.resume, checkpoints)
    if checkpoint is None:
        raise dst_prune.DSTError(f"--resume latest: {checkpoints} holds no checkpoint (no 'latest' file), so there is "
                                 f"nothing to resume. Start the run without --resume, or give the --output-dir of "
                                 f"the run to continue.")
    train_fsdp.check_checkpoint_kind(checkpoint, args.fsdp)
    saved = (train_fsdp.sharded_checkpoint_args if args.fsdp else ckpt.checkpoint_args)(checkpoint)
    if saved is None:
        logger.warning("%s records no flags (an older checkpoint): they cannot be compared; this run's flags apply",
                       checkpoint)
        return checkpoint, []
    return checkpoint, compare_flags(saved, run_args(args, accelerator.num_processes))


def resume(run: Run, checkpoint: Path, changes: list[str]) -> None:
    """Load `checkpoint` (checked completely first), then apply the flags that changed since it was saved."""
    if run.args.fsdp:
        train_fsdp.resume_sharded(run, checkpoint)
    else:
        fresh_groups = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.param_groups]
        ckpt.load_checkpoint(checkpoint, **run.state)
        apply_optimizer_flags(run.optimizer, fresh_groups, run.scheduler, run.args.lr, run.lr_factor)
    run.saved_at = run.progress.optimizer_steps
    run.running = [torch.tensor(v, device=run.accelerator.device) for v in run.progress.unlogged_losses]
    for change in changes:
        logger.info("changed on resume: %s", change)
    logger.info("resumed from %s at epoch %d, batch %d, step %d", checkpoint, run.progress.epoch, run.progress.batch,
                run.progress.optimizer_steps)


def save(run: Run) -> None:
    run.progress.unlogged_losses = [float(v) for v in run.running]  # so a resumed run logs the same rows
    if run.args.fsdp:
        train_fsdp.save_sharded(run, run_args(run.args, run.accelerator.num_processes))
    else:
        ckpt.save_checkpoint(run.checkpoints, run.progress.optimizer_steps, keep=run.args.keep_checkpoints,
                             run_args=run_args(run.args, run.accelerator.num_processes), **run.state)
    run.saved_at = run.progress.optimizer_steps


def micro_batch(run: Run, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Forward and backward one micro-batch; at the end of an accumulation cycle, the optimizer step.

    Returns whether an optimizer step was taken.
    """
    args, accelerator, progress = run.args, run.accelerator, run.progress
    x, y = x.to(accelerator.device), y.to(accelerator.device)
    if args.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    sync = (progress.micro_batches + 1) % args.grad_accum == 0
    if args.fsdp:  # FSDP2's no_sync: gradients accumulate unsharded until the cycle's last micro-batch
        run.model.set_requires_gradient_sync(sync)
    with contextlib.nullcontext() if sync or args.fsdp else accelerator.no_sync(run.model):
        with accelerator.autocast():
            loss = nn.functional.cross_entropy(run.model(x), y)
        accelerator.backward(loss / args.grad_accum)
    progress.micro_batches += 1
    progress.batch += 1
    run.running.append(loss.detach())
    if not sync:
        return False
    if args.clip_grad and args.fsdp:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip_grad)  # the norm over every rank's shards
    elif args.clip_grad:
        accelerator.clip_grad_norm_(run.model.parameters(), args.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    progress.optimizer_steps += 1
    return True


def after_optimizer_step(run: Run, report: ProgressReport) -> None:
    """The controller's step (a reallocation when due), the EMA, the log row."""
    step = run.progress.optimizer_steps
    updated = run.dst.step(skipped=run.accelerator.optimizer_step_was_skipped)
    if updated and run.args.check_sync:
        run.dst.check_sync()
    if run.ema is not None:
        run.ema.update(run.raw_model, step=step)
    if step % run.args.log_every == 0 or updated:
        record = run.dst.history[-1] if run.dst.history else {}
        values = {"loss": float(torch.stack(run.running).mean()), "lr": run.scheduler.get_last_lr()[0],
                  "sparsity": run.dst.sparsity, "epoch": run.progress.epoch,
                  **{k: record[k] for k in ("threshold", "churn", "itop", "drop_fraction") if k in record}}
        run.running.clear()
        run.run_log.log("train", step, values)
        report.update(loss=values["loss"], sparsity=values["sparsity"])
    else:
        report.update()


def train_loop(run: Run, stop: StopRequest, report: ProgressReport) -> int | None:
    """Train to `total_steps`. Returns the signal that stopped it early (after a checkpoint), or None."""
    args, progress = run.args, run.progress
    checkpoint_due = False  # an epoch ended inside an accumulation cycle: checkpoint after its optimizer step
    while progress.optimizer_steps < run.total_steps:
        run.sampler.set_epoch(progress.epoch, skip_batches=progress.batch)
        for x, y in run.loader:
            if not micro_batch(run, x, y):
                continue
            after_optimizer_step(run, report)
            step = progress.optimizer_steps
            if checkpoint_due or (args.checkpoint_every and step % args.checkpoint_every == 0):
                save(run)
                checkpoint_due = False
            received = stop.agreed(run.accelerator, step)
            if received is not None:
                if run.saved_at != step:
                    save(run)
                return received
            if step >= run.total_steps:
                break
        else:  # the epoch ended
            progress.epoch, progress.batch = progress.epoch + 1, 0
            run.run_log.log("val", progress.optimizer_steps, {"epoch": progress.epoch,
                                                               **evaluate(run.model, run.val_set, run.accelerator,
                                                                          args)})
            if not args.checkpoint_every:
                if progress.micro_batches % args.grad_accum == 0:
                    save(run)
                else:
                    checkpoint_due = True
    return None


def _script() -> str:
    """This script's path as the user typed it (when started as a program), else relative to the working folder."""
    if Path(sys.argv[0]).resolve() == Path(__file__).resolve():
        return sys.argv[0]
    return os.path.relpath(__file__)


def stopped(run: Run, signal_number: int, argv: list[str]) -> None:
    """After a stop request: say where the checkpoint is and how to resume, then exit with 128 + the signal."""
    if run.accelerator.is_main_process:
        latest = (run.checkpoints / "latest").read_text()
        print(f"train.py: stopped by {signal.Signals(signal_number).name} after optimizer step "
              f"{run.progress.optimizer_steps} of {run.total_steps}; checkpoint saved in {run.checkpoints / latest}. "
              f"Resume with:\n  {resume_command(argv, run.accelerator.num_processes, _script())}", file=sys.stderr,
              flush=True)
    run.run_log.close()
    run.accelerator.end_training()
    raise SystemExit(128 + signal_number)


def train(args: argparse.Namespace, accelerator: Accelerator, argv: list[str] | None = None) -> dict:
    checkpoint, changes = checkpoint_to_resume(args, accelerator)
    run = build_data(args, accelerator)
    build_model(run)
    if checkpoint is not None:
        resume(run, checkpoint, changes)
    run.run_log = RunLog(args.output_dir, enabled=accelerator.is_main_process,
                         resume_step=run.progress.optimizer_steps if checkpoint is not None else None)
    logger.info("%s on %s: %d tensors sparse at %.4f (%s, %s), %d optimizer steps of %d x %d x %d samples",
                args.model, args.dataset, len(run.dst.targets), run.dst.sparsity, args.method, args.distribution,
                run.total_steps, args.batch_size, args.grad_accum, accelerator.num_processes)
    start = time.perf_counter()
    report = ProgressReport(run.total_steps, run.progress.optimizer_steps, enabled=accelerator.is_main_process)
    with StopRequest(announce=accelerator.is_main_process) as stop:
        signal_number = train_loop(run, stop, report)
        report.close()
        if signal_number is not None:
            stopped(run, signal_number, argv or [])
    if run.saved_at != run.progress.optimizer_steps:
        save(run)  # the final state, unless the loop just saved it
    return finish(run, start)


def finish(run: Run, start: float) -> dict:
    """Final evaluation, tables, plots, and the model files: plain weights and the controller's state."""
    args, accelerator, dst, progress = run.args, run.accelerator, run.dst, run.progress
    summary = {"steps": progress.optimizer_steps, "updates": dst.update_index, "sparsity": dst.sparsity,
               "seconds": time.perf_counter() - start, **evaluate(run.model, run.val_set, accelerator, args)}
    if run.ema is not None:
        summary["ema_val_accuracy"] = evaluate(run.ema.module, run.val_set, accelerator, args)["val_accuracy"]
    summary["model"] = {"name": args.model, **run.model_arguments}  # what create_model needs to rebuild it
    ranks = args.output_dir / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    if args.fsdp:
        weights = train_fsdp.sharded_weights_abs_sum(run.raw_model)
        train_fsdp.final_files(run, args.output_dir)  # gathers weights and masks: on every rank
    else:
        weights = float(sum(p.detach().double().abs().sum() for p in run.raw_model.parameters()))
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
        if not args.fsdp:
            safetensors.torch.save_model(run.raw_model, str(out / "model.safetensors"))  # plain: loads anywhere
            torch.save(dst.state_dict(), out / "dst_state.pt")  # the masks, for dst_prune.load_sparse_state_dict
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(dst.sum_table)
        print(dst.stats_table)
        print(f"{args.model} on {args.dataset}: validation accuracy {summary['val_accuracy']:.4f} at sparsity "
              f"{dst.sparsity:.4f} ({args.method}) after {progress.optimizer_steps} steps, {dst.update_index} "
              f"reallocations; outputs in {out}")
    run.run_log.close()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
