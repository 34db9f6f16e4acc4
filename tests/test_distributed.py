"""Rules 6 and 8 under real DDP: 2 processes over gloo on CPU reach identical masks without broadcasting them.

Every rank trains on other data, so RigL's, SRigL's and SNFS's dense gradients differ per rank until they are
all-reduced: the masks agree only if that averaging happens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "ddp_masks.py"


MODES = ["dsr", "rigl", "srigl", "snfs", "per-rank-seed"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """One torchrun of every mode (one process group, the modes one after the other): {mode: [rank0, rank1]}."""
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(out), ",".join(MODES)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {mode: [json.loads((out / f"rank{r}-{mode}.json").read_text()) for r in range(2)] for mode in MODES}


@pytest.mark.slow
@pytest.mark.parametrize("method", MODES[:-1])
def test_ddp_ranks_agree_on_masks_at_every_update(runs, method):
    rank0, rank1 = runs[method]
    assert rank0["updates"] == rank1["updates"] == 6 and rank0["moved"] > 0
    assert rank0["checks"] == rank1["checks"] == [True] * 6
    assert rank0["digest"] == rank1["digest"]
    assert rank0["weights"] == rank1["weights"]
    assert not rank1["masks_rebroadcast_by_ddp"]  # DDP skips the masks when it broadcasts buffers


@pytest.mark.slow
def test_check_sync_catches_ranks_that_disagree(runs):
    """Negative control: per-rank seeds give per-rank masks, and check_sync says so on every rank."""
    rank0, rank1 = runs["per-rank-seed"]
    assert rank0["digest"] != rank1["digest"]
    for result in (rank0, rank1):
        assert all("masks differ across ranks" in check for check in result["checks"])
