"""2-process runs (gloo, CPU) of dst_prune.optim: DDP trains as torch's optimizers do; free_gradients under DDP and
FSDP2's sharded parameters are refused by name. One JSON file per rank.

    torchrun --standalone --nproc_per_node 2 tests/workers/optim_distributed.py OUT_DIR
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import dst_prune
import dst_prune.optim
from dst_prune.distributed import mask_digest

OPTIMIZERS = {
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
              lambda p: dst_prune.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
            lambda p: dst_prune.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
}


def model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


def train(make_optimizer, rank: int) -> tuple[nn.Module, dst_prune.DynamicSparsity]:
    net = model()
    optimizer = make_optimizer(net.parameters())
    dst = dst_prune.apply(net, sparsity=0.8, method="rigl", optimizer=optimizer, update_every=2, total_steps=12,
                          init="random", drop_fraction=0.5)
    dst.prepare_for_ddp()
    ddp = DistributedDataParallel(net)
    for step in range(8):
        data = torch.Generator().manual_seed(1000 * rank + step)  # every rank sees other data
        x, y = torch.randn(8, 3, 8, 8, generator=data), torch.randint(0, 10, (8,), generator=data)
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        dst.step()
    del ddp
    gc.collect()
    return net, dst


def refusal(action) -> str:
    try:
        action()
    except dst_prune.DSTError as error:
        return str(error)
    return "no error"


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for name, (theirs, ours) in OPTIMIZERS.items():
        (reference, _), (compact, dst) = train(theirs, rank), train(ours, rank)
        result[name] = {
            "digest": mask_digest(dst.targets), "in_sync": dst.check_sync(), "updates": dst.update_index,
            "moved": sum(sum(r["grown"]) for r in dst.history),
            "weights": [p.detach().flatten().tolist() for p in compact.parameters()],
            "max_relative_difference_from_torch": max(
                float(((a - b).abs() / b.abs().clamp_min(1e-6)).max()) for a, b in
                zip(compact.parameters(), reference.parameters())),
            "compact": all(dst.optimizer.state[t.param]["exp_avg" if name == "adamw" else "momentum_buffer"].ndim == 1
                           for t in dst.targets)}
    result["free_gradients_under_ddp"] = refusal(
        lambda: dst_prune.optim.AdamW(model().parameters(), free_gradients=True))
    sharded = model()
    dst_prune.apply(sharded, sparsity=0.8, method="set", update_every=2)
    mesh = init_device_mesh("cpu", (2,))
    for layer in (sharded[0], sharded[2], sharded[5]):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    result["fsdp2_construction"] = refusal(lambda: dst_prune.optim.AdamW(sharded.named_parameters()))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
