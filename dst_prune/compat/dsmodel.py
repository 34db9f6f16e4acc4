"""`DSModel`: the seed's wrapper API, built on `dst_prune.apply` (no second implementation)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

from prettytable import PrettyTable
from torch import nn

from ..api import apply
from ..controller.controller import DynamicSparsity

__all__ = ["DSModel"]


class DSModel(nn.Module):
    """The seed's `dst.reparameterization.DSModel`: wraps a model and exposes DSR's steps and tables.

    `forward` is the wrapped model's. Sparse tensors are named as the seed named them, under `model.`
    (`model.layer1.0.conv1.weight`). The controller `apply` returned is `self.dst`, for everything newer
    (`step()`, schedules, other methods, checkpoints).

    Args:
        model: the model to make sparse (modified in place, like `dst_prune.apply`).
        target_sparsity: the fraction of zeros among the sparse parameters. (The seed counted it over all
            of the model's parameters; for the same number of non-zeros pass
            `target_sparsity * n_total / n_sparse`.)
        target_fraction_to_prune: DSR's `K` as a fraction of the sparse parameters.
        pruning_threshold: DSR's initial threshold `H`.
        **apply_arguments: anything else `dst_prune.apply` takes; `init` defaults to `random` (the seed
            thinned each tensor at random).
    """

    def __init__(self, model: nn.Module, target_sparsity: float = 0.9, target_fraction_to_prune: float = 1e-2,
                 pruning_threshold: float = 1e-3, **apply_arguments: object) -> None:
        super().__init__()
        self.model = model
        apply_arguments.setdefault("init", "random")
        self.target_sparsity = target_sparsity
        self.dst: DynamicSparsity = apply(self, sparsity=target_sparsity, method="dsr",
                                          target_fraction_to_prune=target_fraction_to_prune,
                                          pruning_threshold=pruning_threshold, **apply_arguments)

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.model(*args, **kwargs)

    def reparameterize(self) -> None:
        """DSR's atomic reallocation: prune by threshold, adjust the threshold, reallocate."""
        self.dst.reparameterize()

    def prune_by_threshold(self) -> int:
        return self.dst.prune_by_threshold()

    def adjust_pruning_threshold(self) -> float:
        return self.dst.adjust_pruning_threshold()

    def reallocate_free_parameters(self) -> int:
        return self.dst.reallocate_free_parameters()

    @property
    def pruning_threshold(self) -> float:
        return self.dst.algorithm.threshold

    @property
    def sparsity(self) -> float:
        return self.dst.sparsity

    @property
    def sum_table(self) -> PrettyTable:
        return self.dst.sum_table

    @property
    def stats_table(self) -> PrettyTable:
        return self.dst.stats_table

    def sparse_parameters(self) -> Iterator[nn.Parameter]:
        return self.dst.sparse_parameters()

    def named_sparse_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.dst.named_sparse_parameters()

    def __deepcopy__(self, memo: dict) -> DSModel:
        """A copy of the wrapped model, masks included, without the controller (an EMA needs no controller)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = None if key == "dst" else copy.deepcopy(value, memo)
        return copied
