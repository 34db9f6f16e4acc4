"""`scripts/train.py --fsdp`: the model sharded with FSDP2 (`fully_shard`), checkpoints through DCP.

    torchrun --standalone --nproc_per_node 2 scripts/train.py --fsdp --cpu          # CPU, gloo
    accelerate launch --multi_gpu --num_processes 8 scripts/train.py --fsdp ...     # GPUs, nccl

The script shards the model itself (accelerate's FSDP plugin falls back to DDP on the CPU), in the order
docs/fsdp.md documents: `dst_prune.apply` on the unsharded model, `fully_shard` on every block that holds sparse
weights (`blocks`), then on the root, then the optimizer, handed over with `dst.optimizer = optimizer`.
Checkpoints are `dst_prune.distributed.checkpoint` folders (each rank writes its shards; atomic, verified, no
pickle) whose `extra` holds the script's own state (`dst_prune.training.extra_state`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from accelerate import Accelerator
from torch import nn
from train_resume import apply_optimizer_flags

import dst_prune
from dst_prune.distributed import checkpoint as distributed_checkpoint
from dst_prune.training.extra_state import check_training_extra, load_training_extra, training_extra

if TYPE_CHECKING:
    from train_setup import Run

__all__ = ["REFUSED_WITH_FSDP", "blocks", "check_checkpoint_kind", "check_fsdp_flags", "final_files",
           "find_sharded_checkpoint", "require_process_group", "reshard", "resume_sharded", "save_sharded", "shard",
           "sharded_checkpoint_args", "sharded_weights_abs_sum"]

logger = logging.getLogger("train")

#: flags that do not work together with --fsdp, and why
REFUSED_WITH_FSDP = {
    "compile": "torch.compile of a model sharded by fully_shard with dst_prune's masks is untested; drop --compile",
    "ema": "the EMA (timm's ModelEmaV3) copies the model, which fully_shard shards; drop --ema",
    "fp16": "fp16's GradScaler does not unscale sharded (DTensor) gradients here; use --mixed-precision bf16",
}


def check_fsdp_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for flags that cannot run with --fsdp."""
    if not args.fsdp:
        return
    refused = [("--compile", REFUSED_WITH_FSDP["compile"]) if args.compile else None,
               ("--ema", REFUSED_WITH_FSDP["ema"]) if args.ema else None,
               ("--mixed-precision fp16", REFUSED_WITH_FSDP["fp16"]) if args.mixed_precision == "fp16" else None]
    refused = [r for r in refused if r is not None]
    if refused:
        parser.error("; ".join(f"{flag} cannot be combined with --fsdp: {why}" for flag, why in refused))


def require_process_group(accelerator: Accelerator) -> None:
    """`fully_shard` shards across the processes of a process group: refuse a run started without one."""
    if not torch.distributed.is_initialized():
        raise dst_prune.DSTError(
            "--fsdp shards the model across processes, and this run has no process group (started as a plain "
            "`python scripts/train.py`). Launch it with `torchrun --standalone --nproc_per_node N scripts/train.py "
            "--fsdp ...` or `accelerate launch --multi_gpu --num_processes N scripts/train.py --fsdp ...` (N >= 2; "
            "add --cpu on a machine without GPUs), or train without --fsdp.")


def blocks(model: nn.Module, sparse: set[nn.Parameter]) -> list[nn.Module]:
    """The modules `fully_shard` wraps before the root: the model's blocks that hold sparse weights.

    Top-down from the root: the children of the first `nn.Sequential` or `nn.ModuleList` met on each path (the
    block list of timm and torchvision models: `blocks`, `layers`, `layer1`..`layer4`, `stages`; for a model that
    is itself a `Sequential`, such as LeNet-300-100, its layers) that hold sparse weights are blocks; outside any
    block list, a module that directly owns a parameter and holds sparse weights is one (a layer, or a parent
    that reads its children's weights itself, such as `nn.MultiheadAttention`). What is in no block (a dense
    stem or head, norms) is sharded with the root.
    """
    def holds_sparse(module: nn.Module) -> bool:
        return any(p in sparse for p in module.parameters())

    found: list[nn.Module] = []

    def visit(module: nn.Module, root: bool) -> None:
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            found.extend(child for child in module.children() if holds_sparse(child))
            return
        if not root and any(True for _ in module.parameters(recurse=False)) and holds_sparse(module):
            found.append(module)
            return
        for child in module.children():
            visit(child, root=False)

    visit(model, root=True)
    return found


def shard(model: nn.Module, dst: dst_prune.DynamicSparsity, device: torch.device) -> list[str]:
    """`fully_shard` every block (`blocks`) on a 1-D mesh of all processes, then the root. Returns the blocks' names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units = blocks(model, {t.param for t in dst.targets})
    names = {id(m): n for n, m in model.named_modules()}
    for block in units:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return [names[id(m)] for m in units]


def reshard(model: nn.Module) -> None:
    """Back to the sharded state at rest: FSDP2 keeps the root's parameters gathered after a forward (it expects the
    backward next), so after an evaluation they would stay full on every rank."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_checkpoint_kind(folder: Path, fsdp: bool) -> None:
    """Refuse a checkpoint of the other kind: --fsdp writes sharded (DCP) checkpoints, with `.metadata` and shard
    files; the DDP path whole ones, with `model.safetensors`."""
    sharded, whole = (folder / ".metadata").is_file(), (folder / "model.safetensors").is_file()
    if (fsdp and whole and not sharded) or (not fsdp and sharded and not whole):
        raise dst_prune.DSTError(
            f"{folder} is a {'whole' if whole else 'sharded'} checkpoint, of a run {'without' if fsdp else 'with'} "
            f"--fsdp; this run, {'with' if fsdp else 'without'} --fsdp, cannot continue it. Resume "
            f"{'without' if fsdp else 'with'} --fsdp, as the run was started.")


def find_sharded_checkpoint(resume: str, checkpoints: Path) -> Path | None:
    """The sharded checkpoint `--resume` names: `latest` in `checkpoints` (None when there is none), or a path: a
    checkpoint folder, or a folder whose `latest` names one.

    Raises:
        DSTError: the path holds no checkpoint.
    """
    if resume == "latest":
        return distributed_checkpoint.find_checkpoint(checkpoints)
    folder = distributed_checkpoint.find_checkpoint(resume)
    if folder is None:
        raise dst_prune.DSTError(f"--resume {resume}: not a checkpoint folder (it has no manifest.json, and no "
                                 f"'latest' file naming one)")
    return folder


def sharded_checkpoint_args(folder: Path) -> dict | None:
    """The flags a sharded checkpoint saved (its extra's `args`, verified), or None (a damaged extra is refused by
    name when it loads)."""
    saved = distributed_checkpoint.extra_state(folder).get("args")
    return saved if isinstance(saved, dict) else None


def save_sharded(run: Run, run_args: dict) -> Path:
    """A `distributed_checkpoint` save of the run (every rank): shards, controller, and the script's state."""
    extra = training_extra(scheduler=run.scheduler, progress=run.progress, run_args=run_args)
    return distributed_checkpoint.save(run.checkpoints, run.raw_model, run.optimizer, run.dst, extra=extra,
                                       keep=run.args.keep_checkpoints)


def resume_sharded(run: Run, folder: Path) -> None:
    """Check the checkpoint's extra against this run, then load shards and controller (checked), then the rest.

    Nothing is loaded when anything is refused; every rank checks every rank's entries, so all decide alike.
    """
    fresh_groups = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.param_groups]
    steps = distributed_checkpoint.controller_state(folder).get("step_count")
    where = str(folder / distributed_checkpoint.EXTRA_FILE)
    checked = check_training_extra(where, distributed_checkpoint.extra_state(folder), scheduler=run.scheduler,
                                   progress=run.progress, world_size=run.accelerator.num_processes, steps=steps)
    distributed_checkpoint.load(folder, run.raw_model, run.optimizer, run.dst)
    load_training_extra(checked, scheduler=run.scheduler, progress=run.progress, rank=run.accelerator.process_index)
    apply_optimizer_flags(run.optimizer, fresh_groups, run.scheduler, run.args.lr, run.lr_factor)


def sharded_weights_abs_sum(model: nn.Module) -> float:
    """The sum of |w| over every parameter, from each rank's shards (a collective; the same on every rank)."""
    from dst_prune.distributed.fsdp import local_tensor

    total = sum((local_tensor(p.detach()).double().abs().sum() for p in model.parameters()),
                torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device))
    torch.distributed.all_reduce(total)
    return float(total)


def final_files(run: Run, out: Path) -> None:
    """`model.safetensors` (the full plain state dict, gathered on rank 0) and `dst_state.pt` (every rank computes
    it, rank 0 writes it): the files the DDP path writes, loadable with `strict=True` into an untouched model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(run.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    controller = run.dst.state_dict()  # gathers the sharded masks: on every rank
    if run.accelerator.is_main_process:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
        torch.save(controller, out / "dst_state.pt")  # the masks, for dst_prune.load_sparse_state_dict
