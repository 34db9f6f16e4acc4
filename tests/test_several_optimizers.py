"""`dst.optimizer` as a list of optimizers over different parameters: the state of each is zeroed where masks change."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import dst_prune


def test_a_list_of_optimizers_has_the_state_of_each_zeroed_at_changed_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    sgd = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam([*model[2].parameters(), *model[4].parameters()], lr=0.01)
    dst = dst_prune.apply(model, sparsity=0.75, method="set", update_every=2, dense_stem_and_head=False,
                          optimizer=[sgd, adam])
    for _ in range(4):
        x = torch.randn(8, 16)
        loss = nn.functional.cross_entropy(model(x), x[:, :4].argmax(1))
        sgd.zero_grad()
        adam.zero_grad()
        loss.backward()
        sgd.step()
        adam.step()
        before = {k: m.clone() for k, m in dst.masks().items()}
        dst.step()
    assert dst.update_index == 2
    for target, optimizer in zip(dst.targets, (sgd, adam, adam)):
        changed = before[target.name] != target.mask
        state = [v for v in optimizer.state[target.param].values() if v.shape == target.shape]
        assert changed.any() and state, target.name
        assert all(not t[changed].any() and not t[~target.mask].any() for t in state), target.name

    with pytest.raises(dst_prune.DSTError, match=re.escape("received a list of SGD, str. Several optimizers go in")):
        dst.optimizer = [sgd, "adam"]
    assert dst.optimizer == [sgd, adam]  # unchanged
    with pytest.raises(dst_prune.DSTError, match="received list"):
        dst.optimizer = []
