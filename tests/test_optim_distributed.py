"""dst_prune.optim under real processes (2 ranks over gloo on CPU, one torchrun for all): DDP unchanged, equal to
torch's optimizers; free_gradients under DDP and FSDP2-sharded parameters refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "optim_distributed.py"

pytestmark = pytest.mark.slow  # one torchrun of 2 processes, about 20 s


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("optim_ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_ddp_ranks_agree_and_equal_torchs_optimizer(ranks, optimizer):
    rank0, rank1 = (r[optimizer] for r in ranks)
    assert rank0["updates"] == rank1["updates"] == 4 and rank0["moved"] > 0
    assert rank0["in_sync"] and rank1["in_sync"] and rank0["digest"] == rank1["digest"]
    assert rank0["weights"] == rank1["weights"]
    assert rank0["max_relative_difference_from_torch"] < 1e-5 and rank1["max_relative_difference_from_torch"] < 1e-5
    assert rank0["compact"] and rank1["compact"]


def test_free_gradients_under_ddp_and_fsdp2_shards_are_refused_by_name(ranks):
    for rank in ranks:
        assert rank["free_gradients_under_ddp"].startswith("AdamW(free_gradients=True) cannot run with DDP (a process "
                                                           "group of 2 ranks)")
        assert rank["fsdp2_construction"].startswith("AdamW: '0.weight' (and 7 more) is sharded (a DTensor, e.g. by "
                                                     "FSDP2's fully_shard)")
