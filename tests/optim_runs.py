"""Shared runs of the compact-optimizer tests: one tiny model trained the same way with torch's optimizers and
with dst_prune.optim's, so that the two can be compared step for step."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

import dst_prune
import dst_prune.optim

#: (torch's optimizer, ours), with every option that changes the arithmetic switched on somewhere
OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3),
            lambda p, **k: dst_prune.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3, **k)),
    "sgd_dampened": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, maximize=True),
                     lambda p, **k: dst_prune.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, maximize=True, **k)),
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-3, amsgrad=True),
             lambda p, **k: dst_prune.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-3, amsgrad=True, **k)),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-6, weight_decay=0.1),
              lambda p, **k: dst_prune.optim.AdamW(p, lr=1e-2, eps=1e-6, weight_decay=0.1, **k)),
}
EXTRA = {"dsr": {"pruning_threshold": 0.05}, "rigl": {"drop_fraction": 0.5}}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not thrash a busy machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 4, 4, 4, generator=g), torch.randint(0, 4, (6,), generator=g)


def sparse(model: nn.Module, optimizer: torch.optim.Optimizer, method: str = "rigl", granularity: str = "element",
           **kwargs: object) -> dst_prune.DynamicSparsity:
    sparsity = 0.5 if granularity == "2:4" else 0.7
    arguments = {"sparsity": sparsity, "method": method, "granularity": granularity, "optimizer": optimizer,
                 "update_every": 2, "dense_stem_and_head": False, "init": "random", "total_steps": 12,
                 **EXTRA.get(method, {}), **kwargs}
    return dst_prune.apply(model, **arguments)


class Run:
    """A model, its controller and optimizer, and the masks after every update."""

    def __init__(self, make_optimizer: Callable, method: str = "rigl", granularity: str = "element",
                 scheduler: Callable | None = None, named: bool = False, **kwargs: object) -> None:
        self.model = make_model()
        self.optimizer = make_optimizer(self.model.named_parameters() if named else self.model.parameters())
        self.dst = sparse(self.model, self.optimizer, method, granularity, **kwargs)
        self.scheduler = scheduler(self.optimizer) if scheduler else None
        self.masks: list[list[torch.Tensor]] = []
        self.step_index = 0

    def train(self, steps: int) -> Run:
        for _ in range(steps):
            x, y = batch(self.step_index)
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(x), y).backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            if self.dst.step():
                self.masks.append([t.mask.clone() for t in self.dst.targets])
            self.step_index += 1
        return self


def resumed_from(first: Run, make_optimizer: Callable, method: str) -> Run:
    """A new run that resumes `first` from a checkpoint of its model, controller and optimizer, saved with
    `torch.save` and read back with `weights_only=True`; its `masks` continue `first`'s."""
    buffer = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "dst": first.dst.state_dict(),
                "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Run(make_optimizer, method)
    resumed.model.load_state_dict(saved["model"])
    resumed.dst.load_state_dict(saved["dst"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.step_index, resumed.masks = first.step_index, list(first.masks)
    return resumed


def assert_same(ours: Run, theirs: Run, exact: bool = False) -> None:
    """The same masks after every update and the same weights (float32, 1e-6 relative; or bitwise)."""
    assert len(ours.masks) == len(theirs.masks)
    for a, b in zip(ours.dst.targets, theirs.dst.targets):
        assert torch.equal(a.mask, b.mask), a.name
    for update, (a, b) in enumerate(zip(ours.masks, theirs.masks)):
        for mask_a, mask_b in zip(a, b):
            assert torch.equal(mask_a, mask_b), f"masks differ after update {update}"
    for (name, a), b in zip(ours.model.named_parameters(), theirs.model.parameters()):
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def moved(run: Run) -> int:
    return sum(sum(record["grown"]) for record in run.dst.history)
