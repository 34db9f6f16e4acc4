"""The training variants of `memory_compact.py`: one model, trained dense, masked with torch's optimizer, with
compact optimizer state (`dst_prune.optim`), with compact state and freed gradients, and by the peers.

Every variant builds the same model from the same seed, sees the same batches, and exposes `step()` (zero_grad,
forward, backward, optimizer step, the method's bookkeeping) and the seconds of its last `optimizer.step()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import dst_prune
import dst_prune.optim
from dst_prune.targets import find_targets

SPARSE = ["masked", "compact", "compact_free", "prune", "sparsimony"]
VARIANTS = ["dense", *SPARSE]


@dataclass
class Workload:
    """A model and one batch, the loss of a forward pass, and the optimizer the model trains with."""

    model: nn.Module
    loss: Callable[[nn.Module], torch.Tensor]
    optimizer: str  # "adamw" or "sgd"
    hyperparameters: dict


def gpt2(quick: bool) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64) if quick else GPT2Config()
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (1, 16 if quick else 128), generator=torch.Generator().manual_seed(1))
    return Workload(model, lambda m: m(input_ids=ids, labels=ids).loss, "adamw", {"lr": 1e-4, "weight_decay": 0.01})


def resnet50(quick: bool) -> Workload:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10) if quick else torchvision.models.resnet50()
    g = torch.Generator().manual_seed(1)
    size, batch = (32, 2) if quick else (224, 2)
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return Workload(model, lambda m: nn.functional.cross_entropy(m(x), y), "sgd", {"lr": 0.01, "momentum": 0.9})


MODELS = {"gpt2": gpt2, "resnet50": resnet50}


class Variant:
    """One way of training a workload."""

    def __init__(self, name: str, workload: Workload, sparsity: float, method: str, update_every: int) -> None:
        self.name, self.workload, self.model = name, workload, workload.model
        self.dst = self.sparsifier = None
        kind = workload.optimizer
        torch_optimizer = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
        if name in ("compact", "compact_free"):
            self.optimizer = dst_prune.optim.create(kind, self.model.parameters(),
                                                    free_gradients=name == "compact_free", **workload.hyperparameters)
        else:
            self.optimizer = torch_optimizer(self.model.parameters(), **workload.hyperparameters)
        if name in ("masked", "compact", "compact_free"):
            self.dst = dst_prune.apply(self.model, sparsity=sparsity, method=method, optimizer=self.optimizer,
                                       update_every=update_every, total_steps=10**6, init="random")
        elif name == "prune":
            from torch.nn.utils import prune

            for spec in find_targets(self.model):
                prune.random_unstructured(self.model.get_submodule(spec.module_name), spec.tensor_name,
                                          amount=sparsity)
        elif name == "sparsimony":
            self.sparsifier = _sparsimony(self.model, self.optimizer, sparsity, update_every)
        self.optimizer_seconds = 0.0

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.workload.loss(self.model).backward()
        start = time.perf_counter()
        self.optimizer.step()
        self.optimizer_seconds = time.perf_counter() - start
        if self.dst is not None:
            self.dst.step()
        if self.sparsifier is not None:
            self.sparsifier.step()

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    def fingerprint(self) -> list[float]:
        """Per parameter, the float64 sum of its weights' magnitudes: compares runs across processes."""
        return [float(p.detach().double().abs().sum()) for p in self.model.parameters()]


def n_sparse(model: nn.Module) -> int:
    """The number of weights dst_prune makes sparse by default (before `apply`)."""
    return sum(model.get_submodule(s.module_name)._parameters[s.tensor_name].numel() for s in find_targets(model))


def _sparsimony(model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float, update_every: int):
    from sparsimony.distributions.base import UniformDistribution
    from sparsimony.dst.rigl import RigL
    from sparsimony.schedulers.base import ConstantScheduler

    sparsifier = RigL(scheduler=ConstantScheduler(0.3, t_end=10**6, delta_t=update_every),
                      distribution=UniformDistribution(), optimizer=optimizer, sparsity=sparsity)
    sparsifier.prepare(model, [{"tensor_fqn": s.name} for s in find_targets(model)])
    return sparsifier
