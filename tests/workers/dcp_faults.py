"""Sharded (FSDP2, gloo, CPU) checkpoints under kills: 2 ranks, one JSON file per rank from the resume run.

    torchrun --standalone --nproc_per_node 2 tests/workers/dcp_faults.py save ROOT FAULT
    torchrun --standalone --nproc_per_node 2 tests/workers/dcp_faults.py resume OUT NAME=ROOT ...

`save` trains 3 steps, saves into ROOT, trains 3 more and saves again with FAULT armed: the process SIGKILLs
itself at that point of the second save (the worker injects it by wrapping the function the library calls
there; the library has no fault code). FAULT is one of
  rank1_shards      rank 1, inside DCP's shard write (its first `os.fsync`)
  before_controller rank 0, when `torch.save` is asked to write dst_state.pt
  before_rename     rank 0, when the finished `.partial-*` folder is about to be renamed into place
  before_pointer    rank 0, when `latest` is about to be replaced
  before_cleanup    rank 0, when the checkpoint before is about to be removed (keep=1), after `latest` moved
`resume` runs the uninterrupted reference, then for each ROOT: a fresh sharded model loads it; it records the
step reached, whether weights, masks, optimizer state and controller equal the reference's at that step
bitwise, whether 6 steps end bitwise equal to the uninterrupted run, and what a further save leaves in ROOT.
A NAME starting with `refused` must be refused: it records the DSTError and whether everything stayed unchanged;
for `refused_rank1_only`, rank 1 alone builds another run (sparsity 0.7), so rank 1 alone refuses at first.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dst_prune
from dst_prune.distributed import checkpoint as distributed_checkpoint
from dst_prune.distributed.fsdp import local_tensor

FIRST, TOTAL = 3, 6


def build(mesh, sparsity: float = 0.8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 33), nn.ReLU(), nn.Linear(33, 33), nn.ReLU(), nn.Linear(33, 3))
    dst = dst_prune.apply(model, sparsity=sparsity, method="rigl", update_every=2, total_steps=20, init="random",
                          dense_stem_and_head=False, seed=0)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    dst.optimizer = optimizer
    return model, optimizer, dst


def train(model, optimizer, dst, steps) -> None:
    for step in steps:
        data = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
        x = torch.randn(8, 12, generator=data)
        loss = nn.functional.cross_entropy(model(x), x[:, :3].argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dst.step()


def local(value: object) -> object:
    """A copy of a (nested) state with every DTensor replaced by this rank's shard."""
    if isinstance(value, torch.Tensor):
        return local_tensor(value).detach().clone()
    if isinstance(value, dict):
        return {k: local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [local(v) for v in value]
    return copy.deepcopy(value)


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def state(model, optimizer, dst) -> dict:
    """This rank's shards of weights, masks and optimizer state, and the controller's state (a collective)."""
    return {"weights": local([p for p in model.parameters()]), "masks": local([t.buffer_mask for t in dst.targets]),
            "optimizer": local([optimizer.state.get(p, {}) for p in model.parameters()]),
            "controller": local(dst.state_dict())}


def kill_when(module: object, name: str, should_kill) -> None:
    """Wrap `module.name` so that the process SIGKILLs itself when `should_kill(*args)` is true."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        if should_kill(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def arm(fault: str, rank: int) -> None:
    def path_name(value) -> str:
        return Path(value).name if isinstance(value, (str, os.PathLike)) else ""

    if fault == "rank1_shards" and rank == 1:
        kill_when(os, "fsync", lambda *args: True)
    elif fault == "before_controller" and rank == 0:
        kill_when(torch, "save", lambda obj, file, *rest: path_name(file).startswith("dst_state.pt"))
    elif fault == "before_rename" and rank == 0:
        kill_when(os, "replace", lambda source, target, *rest: path_name(source).startswith(".partial-"))
    elif fault == "before_pointer" and rank == 0:
        kill_when(os, "replace", lambda source, target, *rest: path_name(target) == "latest")
    elif fault == "before_cleanup" and rank == 0:
        kill_when(shutil, "rmtree", lambda path, *rest: path_name(path).startswith("step-"))


def save_run(mesh, root: str, fault: str) -> None:
    model, optimizer, dst = build(mesh)
    train(model, optimizer, dst, range(FIRST))
    distributed_checkpoint.save(root, model, optimizer, dst, keep=1, extra={"step": FIRST})
    train(model, optimizer, dst, range(FIRST, TOTAL))
    arm(fault, dist.get_rank())
    distributed_checkpoint.save(root, model, optimizer, dst, keep=1, extra={"step": TOTAL})


def resume_run(mesh, out: str, roots: list[str]) -> None:
    rank = dist.get_rank()
    model, optimizer, dst = build(mesh)
    reference = {0: state(model, optimizer, dst)}
    train(model, optimizer, dst, range(FIRST))
    reference[FIRST] = state(model, optimizer, dst)
    train(model, optimizer, dst, range(FIRST, TOTAL))
    reference[TOTAL] = state(model, optimizer, dst)
    del model, optimizer, dst
    results = {}
    for item in roots:
        name, root = item.split("=", 1)
        model, optimizer, dst = build(mesh, 0.7 if name == "refused_rank1_only" and rank == 1 else 0.8)
        before = state(model, optimizer, dst)
        try:
            extra = distributed_checkpoint.load(root, model, optimizer, dst)
        except dst_prune.DSTError as error:
            results[name] = {"refused": str(error), "unchanged": same(state(model, optimizer, dst), before)}
            continue
        step = dst.step_count
        result = {"step": step, "extra": extra, "equal_at_step": same(state(model, optimizer, dst), reference[step])}
        train(model, optimizer, dst, range(step, TOTAL))
        result["equal_at_end"] = same(state(model, optimizer, dst), reference[TOTAL])
        distributed_checkpoint.save(root, model, optimizer, dst, keep=1)
        result["after_save"] = sorted(p.name for p in Path(root).iterdir())
        results[name] = result
        del model, optimizer, dst
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if sys.argv[1] == "save":
        save_run(mesh, sys.argv[2], sys.argv[3])
    else:
        resume_run(mesh, sys.argv[2], sys.argv[3:])
    gc.collect()  # (see ddp_masks.py: free what holds the process group before destroying it)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
