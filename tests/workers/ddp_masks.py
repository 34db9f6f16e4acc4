"""A 2-process DDP run (gloo, CPU) of DSR; each rank writes its mask digest and sync checks to a JSON file.

    torchrun --standalone --nproc_per_node 2 tests/workers/ddp_masks.py OUT_DIR MODE[,MODE...]

MODE: `dsr`, `rigl`, `srigl`, `snfs` (one seed, other data on each rank) or `per-rank-seed` (DSR with a seed per
rank, which breaks masking rule 8 on purpose: the negative control). The modes run one after the other in
one process group; each writes `rank<r>-<mode>.json`.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dst_prune
from dst_prune.distributed.ddp import mask_digest


def run(out_dir: str, mode: str, rank: int) -> None:
    method = mode if mode in ("rigl", "srigl", "snfs") else "dsr"
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seed = rank if mode == "per-rank-seed" else 0
    extra = {"pruning_threshold": 0.05} if method == "dsr" else {"total_steps": 12, "decay": "constant"}
    dst = dst_prune.apply(model, sparsity=0.8, method=method, optimizer=optimizer, update_every=1, seed=seed,
                          init="random", **extra)
    dst.prepare_for_ddp()
    ddp = DistributedDataParallel(model)
    # DDP must not re-broadcast masks at every forward: change one mask entry on rank 1 and see it stay
    probe = dst.targets[0].mask.view(-1)
    original = bool(probe[0])
    if rank == 1:
        probe[0] = not original
    with torch.no_grad():
        ddp(torch.zeros(1, 3, 8, 8))
    rebroadcast = bool(probe[0]) == original if rank == 1 else False
    probe[0] = original
    checks = []
    for step in range(6):
        data = torch.Generator().manual_seed(1000 * rank + step)  # every rank sees other data
        x, y = torch.randn(8, 3, 8, 8, generator=data), torch.randint(0, 10, (8,), generator=data)
        loss = nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dst.step()
        try:
            checks.append(dst.check_sync())
        except RuntimeError as error:
            checks.append(str(error))
    weights = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    result = {"rank": rank, "digest": mask_digest(dst.targets), "checks": checks, "weights": weights,
              "updates": dst.update_index, "moved": sum(sum(r["grown"]) for r in dst.history),
              "masks_rebroadcast_by_ddp": rebroadcast}
    Path(out_dir, f"rank{rank}-{mode}.json").write_text(json.dumps(result))
    # Free DDP, which holds the process group, before destroying the group, so that gloo's worker threads
    # are joined now. Left to interpreter exit, a gloo thread can free a finished all-reduce (whose tensors
    # are Python objects) while the interpreter is finalizing, and the process aborts with "terminate
    # called without an active exception" after all its work is done (torch issue, seen 1 run in 10).
    del ddp
    gc.collect()


def main(out_dir: str, modes: str) -> None:
    dist.init_process_group("gloo")
    for mode in modes.split(","):
        run(out_dir, mode, dist.get_rank())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
