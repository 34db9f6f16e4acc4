"""FSDP2 (`fully_shard`, gloo, CPU) runs of every method next to an unsharded reference; one JSON file per rank.

    torchrun --standalone --nproc_per_node 2 tests/workers/fsdp_masks.py OUT_DIR

For every configuration (method, granularity) both ranks train the same model sharded with `fully_shard`
(per layer, then the root; the optimizer built after sharding and handed over with `dst.optimizer = opt`),
each rank on its own data, and an unsharded copy on both ranks' data together (the same gradients as a
2-rank DDP run, up to reduction order). After every step it records: `check_sync`, the exact global count
from the gathered masks, zeros outside the masks in the weight, gradient and Adam state shards, the digest
of the gathered masks, and how many mask positions and how much weight differ from the reference. Then the
refusals: a mask shard changed on one rank (check_sync must fail), `apply` after `fully_shard`, and FSDP1.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dst_prune
from dst_prune.distributed.ddp import mask_digest
from dst_prune.distributed.fsdp import local_tensor

STEPS = 8
CONFIGS = [("static", "element"), ("set", "element"), ("dsr", "element"), ("rigl", "element"),
           ("srigl", "element"), ("snfs", "element"), ("gmp", "element"), ("granet", "element"), ("set", "kernel"),
           ("rigl", "channel"), ("dsr", "kernel"), ("snfs", "channel")]


class Net(nn.Module):
    """Two convs and two linears; fc1 has 33 rows, so its shards are uneven (17 and 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 33), nn.Linear(33, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def arguments(method: str, granularity: str) -> dict:
    extra = {"dsr": {"pruning_threshold": 0.05}, "gmp": {"initial_sparsity": 0.5, "total_steps": STEPS},
             "granet": {"initial_sparsity": 0.5, "total_steps": STEPS, "distribution": "global"}
             if granularity == "element" else {}}.get(method, {"total_steps": STEPS})
    return {"sparsity": 0.8, "method": method, "granularity": granularity, "update_every": 1, "init": "random",
            "dense_stem_and_head": False, **extra}


def make_optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (two state tensors to check), but SGD with momentum where growth ranks by the gradient: Adam's first
    steps are `lr * sign(g)`, which turns a gradient that rounding leaves at +-1e-12 into a tie-breaking weight."""
    if method in ("rigl", "snfs"):
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=0.01)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 3, 8, 8, generator=data), torch.randint(0, 10, (8,), generator=data)


def sharded(model: nn.Module, mesh) -> nn.Module:
    for layer in (model.conv1, model.conv2, model.fc1, model.fc2):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def zeros_outside(dst, optimizer) -> bool:
    """Weight, gradient and every optimizer state shard are zero outside this rank's mask shard."""
    for target in dst.targets:
        param, mask = target.param, target.buffer_mask
        state = optimizer.state.get(param, {})
        tensors = [param, param.grad, *(v for v in state.values() if getattr(v, "shape", None) == param.shape)]
        for tensor in tensors:
            if tensor is not None and bool(local_tensor(tensor).detach()[~mask].any()):
                return False
    return True


def run(method: str, granularity: str, mesh, rank: int) -> dict:
    torch.manual_seed(0)
    model = Net()
    dst = dst_prune.apply(model, seed=0, **arguments(method, granularity))
    sharded(model, mesh)
    optimizer = make_optimizer(method, model)
    dst.optimizer = optimizer
    torch.manual_seed(0)
    reference = Net()
    ref_optimizer = make_optimizer(method, reference)
    ref = dst_prune.apply(reference, seed=0, optimizer=ref_optimizer, **arguments(method, granularity))
    records, started = [], time.perf_counter()
    for step in range(STEPS):
        x, y = batch(rank, step)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        updated = dst.step()
        both = [batch(r, step) for r in range(dist.get_world_size())]
        ref_loss = nn.functional.cross_entropy(reference(torch.cat([b[0] for b in both])),
                                               torch.cat([b[1] for b in both]))
        ref_optimizer.zero_grad()
        ref_loss.backward()
        ref_optimizer.step()
        ref.step()
        full_masks = [t.full_mask() for t in dst.targets]
        full_weights = [t.param.detach().full_tensor() for t in dst.targets]
        records.append({
            "step": step + 1, "updated": updated, "check_sync": dst.check_sync(),
            "count": sum(int(m.sum()) for m in full_masks), "budget": dst.budget,
            "groups": sum(int(t.grouping.group_mask(m).sum()) for t, m in zip(dst.targets, full_masks)),
            "cached_groups": sum(t.active_groups() for t in dst.targets),
            "zeros_outside": zeros_outside(dst, optimizer),
            "digest": mask_digest(dst.targets),
            "mask_mismatch": sum(int((m != r.mask).sum()) for m, r in zip(full_masks, ref.targets)),
            "weight_diff": max(float((w - r.param.detach()).abs().max()) for w, r in zip(full_weights, ref.targets)),
            "ref_budget": ref.budget})
    state = dst.state_dict()
    return {"records": records, "updates": dst.update_index, "moved": sum(sum(h["grown"]) for h in dst.history),
            "n_groups": dst.n_groups, "seconds": time.perf_counter() - started,
            "sharded": all(t.sharded for t in dst.targets),
            "mask_shard_numel": sum(t.buffer_mask.numel() for t in dst.targets), "n_sparse": dst.n_sparse,
            "state_masks_digest": state["masks_digest"], "ref_masks_digest": ref.state_dict()["masks_digest"]}


def refusals(mesh, rank: int) -> dict:
    result = {}
    torch.manual_seed(0)
    model = Net()
    dst = dst_prune.apply(model, sparsity=0.8, method="set", update_every=1, init="random",
                          dense_stem_and_head=False)
    sharded(model, mesh)
    dst.optimizer = optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(rank, 0)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    dst.step()
    result["agreeing"] = dst.check_sync()
    if rank == 1:  # one rank's shard no longer holds the masks every rank decided (e.g. loaded from elsewhere)
        mask = dst.targets[2].buffer_mask.view(-1)
        mask[0] = not bool(mask[0])
    try:
        result["flipped_shard"] = dst.check_sync()
    except RuntimeError as error:
        result["flipped_shard"] = str(error)
    late = sharded(Net(), mesh)
    try:
        dst_prune.apply(late, sparsity=0.8, dense_stem_and_head=False)
        result["apply_after_fully_shard"] = "no error"
    except dst_prune.DSTError as error:
        result["apply_after_fully_shard"] = str(error)
    from torch.distributed.fsdp import FullyShardedDataParallel

    for use_orig_params in (True, False):
        torch.manual_seed(0)
        model = Net()
        dst = dst_prune.apply(model, sparsity=0.8, method="set", update_every=1, dense_stem_and_head=False)
        try:
            wrapped = FullyShardedDataParallel(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"))
            dst.optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.01)
            wrapped(batch(rank, 0)[0]).sum().backward()
            dst.step()
            result[f"fsdp1_{use_orig_params}"] = "no error"
        except dst_prune.DSTError as error:
            result[f"fsdp1_{use_orig_params}"] = str(error)
        except Exception as error:  # recorded: the test says which error it was
            result[f"fsdp1_{use_orig_params}"] = f"not a DSTError: {type(error).__name__}: {error}"
        del model, dst
    try:
        torch.manual_seed(0)
        wrapped = FullyShardedDataParallel(Net(), device_id=torch.device("cpu"))
        dst_prune.apply(wrapped, sparsity=0.8, dense_stem_and_head=False)
        result["apply_to_fsdp1"] = "no error"
    except dst_prune.DSTError as error:
        result["apply_to_fsdp1"] = str(error)
    except Exception as error:
        result["apply_to_fsdp1"] = f"not a DSTError: {type(error).__name__}: {error}"
    return result


def checkpoint(mesh, rank: int, out_dir: str) -> dict:
    """SNFS (its momentum is controller state) for 6 steps, against 3 steps, a DCP save, a fresh sharded model
    loading it, and 3 more steps; then the checkpoint read on one process into an unsharded model."""
    from dst_prune.distributed import checkpoint as distributed_checkpoint

    def build():
        torch.manual_seed(0)
        model = Net()
        dst = dst_prune.apply(model, seed=0, **arguments("snfs", "element"))
        sharded(model, mesh)
        optimizer = make_optimizer("snfs", model)
        dst.optimizer = optimizer
        return model, dst, optimizer

    def train(model, dst, optimizer, steps):
        for step in steps:
            x, y = batch(rank, step)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            dst.step()

    def weights(model):
        return [p.detach().full_tensor() for p in model.parameters()]

    model, dst, optimizer = build()
    train(model, dst, optimizer, range(6))
    straight, straight_digest = weights(model), mask_digest(dst.targets)
    model, dst, optimizer = build()
    train(model, dst, optimizer, range(3))
    path = str(Path(out_dir, "dcp"))
    distributed_checkpoint.save(path, model, optimizer, dst)
    saved_digest = mask_digest(dst.targets)
    del model, dst, optimizer
    model, dst, optimizer = build()
    distributed_checkpoint.load(path, model, optimizer, dst)
    result = {"resumed_step": dst.step_count, "resumed_digest_equal": mask_digest(dst.targets) == saved_digest}
    train(model, dst, optimizer, range(3, 6))
    result["bitwise_equal"] = mask_digest(dst.targets) == straight_digest and all(
        torch.equal(a, b) for a, b in zip(straight, weights(model)))
    dist.barrier()
    if rank == 0:
        plain = Net()  # an untouched model: the checkpoint's weights, read on one process
        state = distributed_checkpoint.load_unsharded(path, plain)
        result["plain_missing_unexpected"] = [list(x) for x in Net().load_state_dict(state, strict=True)]
        torch.manual_seed(0)
        unsharded = Net()
        controller = dst_prune.apply(unsharded, seed=0, **arguments("snfs", "element"))
        unsharded.load_state_dict(state)
        controller.load_state_dict(distributed_checkpoint.controller_state(path))
        result["unsharded_digest_equal"] = mask_digest(controller.targets) == saved_digest
        result["unsharded_zeros_outside"] = all(not bool(t.param.detach()[~t.mask].any()) for t in controller.targets)
    dist.barrier()
    return result


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    result = {"rank": rank, "runs": {}}
    for method, granularity in CONFIGS:
        if only is None or method in only:
            result["runs"][f"{method}:{granularity}"] = run(method, granularity, mesh, rank)
    result["refusals"] = refusals(mesh, rank)
    if only is None or "checkpoint" in only:
        result["checkpoint"] = checkpoint(mesh, rank, out_dir)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    gc.collect()  # (see ddp_masks.py: free what holds the process group before destroying it)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
