"""`dst_prune.distributed.checkpoint` on one process: the round trip, the unsharded read for inference, and files
that would run code when unpickled (DCP's `.metadata`, the controller's file) refused unread. The sharded runs
are in tests/test_fsdp.py."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import dst_prune
from dst_prune.distributed import checkpoint as distributed_checkpoint


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dst = dst_prune.apply(model, sparsity=0.8, method="rigl", optimizer=optimizer, update_every=2, total_steps=20,
                          dense_stem_and_head=False)
    return model, optimizer, dst


def train(model, optimizer, dst, steps) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 12, generator=g)
        loss = nn.functional.cross_entropy(model(x), x[:, :3].argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dst.step()


@pytest.fixture
def saved(tmp_path):
    model, optimizer, dst = build()
    train(model, optimizer, dst, range(5))
    distributed_checkpoint.save(tmp_path / "ckpt", model, optimizer, dst)
    return tmp_path / "ckpt", model, optimizer, dst


def test_round_trip_resumes_exactly_and_reads_unsharded(saved):
    path, model, optimizer, dst = saved
    straight = [p.detach().clone() for p in model.parameters()]
    saved_masks = [t.mask.clone() for t in dst.targets]
    train(model, optimizer, dst, range(5, 9))
    resumed_model, resumed_optimizer, resumed = build(seed=7)  # other initial weights: all must come from the file
    distributed_checkpoint.load(path, resumed_model, resumed_optimizer, resumed)
    assert all(torch.equal(a, b.detach()) for a, b in zip(straight, resumed_model.parameters()))
    train(resumed_model, resumed_optimizer, resumed, range(5, 9))
    assert resumed.history == dst.history
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(model.parameters(), resumed_model.parameters()))

    untouched = mlp()
    state = distributed_checkpoint.load_unsharded(path, untouched)  # weights in place, masks not needed
    assert not dst_prune.is_sparse(untouched)
    sparse_again = mlp()
    controller = dst_prune.load_sparse_state_dict(sparse_again, state,
                                                  masks=distributed_checkpoint.controller_state(path))
    assert controller.budget == dst.budget
    assert all(torch.equal(a.mask, b) for a, b in zip(controller.targets, saved_masks))
    x = torch.randn(4, 12)
    assert torch.equal(untouched(x), sparse_again(x))


@pytest.mark.parametrize("name", [".metadata", distributed_checkpoint.CONTROLLER_FILE])
def test_a_payload_in_a_checkpoint_file_never_runs(saved, tmp_path, name):
    path = saved[0]
    marker = tmp_path / "payload-ran"
    if name == ".metadata":
        (path / name).write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(Payload(marker), path / name)
    model, optimizer, dst = build(seed=7)
    before = [p.detach().clone() for p in model.parameters()], [t.mask.clone() for t in dst.targets]
    with pytest.raises(dst_prune.DSTError, match=name.replace(".", r"\.")):
        distributed_checkpoint.load(path, model, optimizer, dst)
    with pytest.raises(dst_prune.DSTError):
        distributed_checkpoint.load_unsharded(path, build(seed=7)[0]) if name == ".metadata" else \
            distributed_checkpoint.controller_state(path)
    assert not marker.exists()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before[0], model.parameters()))
    assert all(torch.equal(a, t.mask) for a, t in zip(before[1], dst.targets))
