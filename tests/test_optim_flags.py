"""dst_prune.optim with torch's implementation flags: `foreach` and `fused` update a whole param group in one call
(their default on CUDA), with the same results as torch's optimizer given the same flags."""

from __future__ import annotations

import pytest
import torch
from optim_runs import Run, assert_same, one_thread  # noqa: F401

import dst_prune.optim

FLAGS = [{"foreach": True}, {"fused": True}, {"foreach": False}]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_foreach_and_fused_give_torchs_results(name, flags):
    if name == "sgd":
        kwargs = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
        theirs, ours = torch.optim.SGD, dst_prune.optim.SGD
    else:
        kwargs = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": name == "adam", "maximize": name == "adamw"}
        theirs, ours = (torch.optim.Adam, dst_prune.optim.Adam) if name == "adam" else \
            (torch.optim.AdamW, dst_prune.optim.AdamW)
    reference = Run(lambda p: theirs(p, **kwargs, **flags), "rigl").train(6)
    run = Run(lambda p: ours(p, **kwargs, **flags), "rigl").train(6)
    assert_same(run, reference)
    target = run.dst.targets[1]
    state = run.optimizer.state[target.param]
    assert state["active_indices"].numel() == target.active()
