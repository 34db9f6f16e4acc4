"""`SparsityContext`: what an algorithm sees of a sparse model, and the one place masks are written.

An algorithm ranks; the context does the bookkeeping of DESIGN.md rules 2, 3 and 7 for it: masks are
written in place, pruned weights are zeroed, regrown ones start at zero, and the gradient and every
optimizer state tensor of the parameter's shape are zeroed at both. Every write is recorded in the
open `Transaction` (if any), so an update that fails halfway is undone exactly (rule 11).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .distributed import all_reduce_mean
from .errors import DSTError
from .gradients import DenseGradient
from .optimizer_state import optimizer_state_like, unwrap_optimizer
from .schedules import UpdateSchedule
from .scores import finite_gradient
from .selection import GROWTH_STREAM, derive_seed, index_mask
from .sharding import local_tensor
from .sparse_target import SparseTarget

__all__ = ["SparsityContext", "Transaction"]


class Transaction:
    """The undo log of one update: the old values at every position a write changed.

    Costs memory in proportion to the positions changed (a few percent of the weights), not to the model.
    """

    def __init__(self) -> None:
        self.writes: list[tuple[SparseTarget, torch.Tensor, torch.Tensor | None, bool, list]] = []
        self.taken: list[tuple[DenseGradient, torch.Tensor | None]] = []  # dense gradients consumed

    def record(self, target: SparseTarget, indices: torch.Tensor, positions: torch.Tensor | None, active: bool,
               tensors: Sequence[torch.Tensor], at: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        """Save the values of `tensors` at `at` (local `(indices, positions)` of shards; default: the mask's)."""
        where = (indices, positions) if at is None else at
        saved = [(t, _read(t, *where)) for t in tensors]
        self.writes.append((target, indices, positions, active, (where, saved)))

    def undo(self) -> None:
        with torch.no_grad():
            for target, indices, positions, active, (where, saved) in reversed(self.writes):
                for tensor, values in saved:
                    _write(tensor, *where, values)
                _fill(target.mask, indices, positions, not active)
                target.refresh()
        for sink, value in self.taken:  # a retry finds the gradients it needs
            sink.value = value
        self.writes.clear()
        self.taken.clear()


def _read(tensor: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if tensor.is_contiguous() or positions is None:
        return tensor.reshape(-1)[indices.to(tensor.device)].clone()
    return tensor[positions.to(tensor.device)].clone()


def _write(tensor: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor | None, values: torch.Tensor) -> None:
    if tensor.is_contiguous() or positions is None:
        tensor.view(-1).index_copy_(0, indices.to(tensor.device), values)
    else:
        tensor[positions.to(tensor.device)] = values


def _fill(tensor: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor | None, value: object) -> None:
    """Write `value` at flat row-major `indices` (just those, when `tensor` is contiguous), else at `positions`."""
    if tensor.is_contiguous():
        tensor.view(-1).index_fill_(0, indices.to(tensor.device), value)
    else:
        tensor.masked_fill_(positions.to(tensor.device), value)


class SparsityContext:
    """The state an algorithm works on: the sparse tensors, the budget, the step, seeds and the optimizer.

    Attributes:
        targets: the sparse parameters (`SparseTarget`), in registration order; `layer` indexes them.
        seed: the seed of every random draw.
        schedule: when updates happen.
        target_sparsity: the sparsity `apply` was asked for.
        distribution: how the budget is split across layers.
        total_steps: the length of training in optimizer steps, if given.
        budget: the exact number of active groups (weights, for `element`) after every update.
        step: optimizer steps counted so far.
        update_index: updates done so far.
        optimizer: whose state is zeroed at changed positions (may be wrapped, e.g. by accelerate).
        sinks: the captured dense gradients, one per target.
    """

    def __init__(self, targets: list[SparseTarget], *, seed: int, schedule: UpdateSchedule, target_sparsity: float,
                 distribution: str, total_steps: int | None, budget: int) -> None:
        self.targets = targets
        self.seed = seed
        self.schedule = schedule
        self.target_sparsity = target_sparsity
        self.distribution = distribution
        self.total_steps = total_steps
        self.budget = budget
        self.step = 0
        self.update_index = 0
        self.optimizer: object = None
        self.sinks = [DenseGradient() for _ in targets]
        self.transaction: Transaction | None = None
        self.pruned = [0] * len(targets)
        self.grown = [0] * len(targets)
        self.dirty: set[int] = set()

    @property
    def n_groups(self) -> int:
        """The number of groups the budget counts (the number of sparse weights for `element`)."""
        return sum(t.n_groups for t in self.targets)

    @property
    def decay_end(self) -> int | None:
        """The step at which decaying drop fractions reach zero: the stop step, else `total_steps`."""
        return self.schedule.stop_step if self.schedule.stop_step is not None else self.total_steps

    def generator(self, layer: int) -> torch.Generator:
        """The generator of `layer` in the current update; depends only on (seed, update index, layer)."""
        seed = derive_seed(self.seed, GROWTH_STREAM, self.update_index, layer)
        return torch.Generator(device=self.targets[layer].mask.device).manual_seed(seed)

    def dense_gradients(self, method: str) -> list[torch.Tensor]:
        """The captured dense gradients of every target (consumed), finite, averaged across ranks.

        A tensor no backward reached this step (an unused branch) gets a zero gradient.
        """
        if all(s.value is None for s in self.sinks):
            raise DSTError(f"method={method!r} grows by the dense gradient, but none was captured. Call dst.step() "
                           f"after every optimizer step, or dst.capture_dense_gradients() before the backward pass "
                           f"that precedes a manual dst.reparameterize().")
        grads = [s.take() for s in self.sinks]
        grads = [torch.zeros(t.shape, device=t.mask.device) if g is None else g for g, t in zip(grads, self.targets)]
        all_reduce_mean(grads)  # before the finite check: every rank sees the same non-finite entries
        grads = [finite_gradient(g, t.name) for g, t in zip(grads, self.targets)]
        if self.transaction is not None:
            self.transaction.taken.extend(zip(self.sinks, grads))
        return grads

    # --- the writes --------------------------------------------------------------------------------
    def set_indices(self, layer: int, indices: torch.Tensor, active: bool,
                    positions: torch.Tensor | None = None) -> int:
        """Activate (or deactivate) the weights of `layer` at flat row-major `indices`, which must all change.

        Zeroes the weight, its gradient and its optimizer state there. Returns the number of groups changed.
        """
        target = self.targets[layer]
        count = indices.numel() // target.grouping.group_size
        if count:
            if positions is None and not target.mask.is_contiguous():
                positions = index_mask(indices, target.shape, target.mask.device)
            param = target.param
            tensors = [t for t in (param, param.grad, *optimizer_state_like(unwrap_optimizer(self.optimizer), param))
                       if t is not None]
            at = None
            if target.sharded:  # write each rank's shards by index; the full mask is the update's (`sharding`)
                tensors = [local_tensor(t) for t in tensors]
                if positions is None and not all(t.is_contiguous() for t in tensors):
                    positions = index_mask(indices, target.shape, target.mask.device)
                at = target.layout.local_indices(indices, positions)
                target.scope.forget_weight(target)
            if self.transaction is not None:
                self.transaction.record(target, indices, positions, active, [*tensors, target.buffer_mask]
                                        if target.sharded else tensors, at)
            where = (indices, positions) if at is None else at
            with torch.no_grad():
                _fill(target.mask, indices, positions, active)
                if target.sharded:
                    _fill(target.buffer_mask, *where, active)
                for tensor in tensors:
                    _fill(tensor, *where, 0)
            self.dirty.add(layer)
        if active:
            self.grown[layer] += count
        else:
            self.pruned[layer] += count
        return count

    def set_groups(self, layer: int, groups: torch.Tensor, active: bool) -> int:
        """Activate (or deactivate) the groups of `layer` at `groups` (bool, group shape) that are not yet so."""
        target = self.targets[layer]
        current = target.group_mask()
        groups = groups & (current.logical_not() if active else current)
        positions = target.grouping.expand(groups)
        return self.set_indices(layer, positions.reshape(-1).nonzero().view(-1), active, positions)

    def refresh_changed(self) -> None:
        """Recompute the effective weights of the tensors whose masks changed (once per tensor per update)."""
        for layer in sorted(self.dirty):
            self.targets[layer].refresh()
        self.dirty.clear()

    def take_changes(self) -> tuple[list[int], list[int]]:
        """The groups pruned and grown per layer since the last call."""
        changes = (self.pruned, self.grown)
        self.pruned, self.grown = [0] * len(self.targets), [0] * len(self.targets)
        return changes
