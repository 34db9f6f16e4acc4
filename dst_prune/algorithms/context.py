"""`SparsityContext`: what an algorithm sees of a sparse model, and the one place masks are changed.

An algorithm ranks; the context does the bookkeeping of masking rules 2, 3 and 7 (docs/design.md) for it:
masks are written in place, pruned weights are zeroed, regrown ones start at zero, and the gradient and
every optimizer state tensor of the parameter's shape are zeroed at both. Every write goes through the
target (`SparseTarget.write`, a sharded parameter's writes reach each rank's shard) and is recorded in
the open `Transaction` (if any), so an update that fails halfway is undone exactly (rule 11).
"""

from __future__ import annotations

import weakref

import torch

from .._masking.gradients import DenseGradient
from .._masking.target import SparseTarget
from .._masking.transaction import Transaction
from .._optimizer_state import optimizer_state_like, unwrap_optimizer
from .._scores import finite_gradient
from .._selection import GROWTH_STREAM, derive_seed
from ..config import SparsityConfig
from ..distributed.ddp import all_reduce_mean
from ..errors import DSTError
from ..schedules import UpdateSchedule

__all__ = ["SparsityContext", "TensorVersion"]


class TensorVersion:
    """A tensor's identity and content version: equal while it is the same live tensor and nothing wrote it in
    place (`Tensor._version`, which every in-place write bumps, as `masked_weight` relies on too). A weak
    reference: a tensor freed and another allocated at the same address is not equal."""

    __slots__ = ("ref", "state")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.state = (tensor.data_ptr(), tensor._version, tuple(tensor.shape))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TensorVersion) and self.state == other.state and self.ref() is not None
                and self.ref() is other.ref())

    __hash__ = None


class SparsityContext:
    """The state an algorithm works on: the sparse tensors, the budget, the step, seeds and the optimizer.

    Attributes:
        targets: the sparse parameters (`SparseTarget`), in registration order; `layer` indexes them.
        config: the arguments `apply` was given (`SparsityConfig`).
        schedule: when updates happen (from the config and the method's default stop fraction).
        budget: the exact number of active groups (weights, for `element`) after every update.
        step: optimizer steps counted so far.
        update_index: updates done so far.
        optimizer: whose state is zeroed at changed positions (may be wrapped, e.g. by accelerate).
        sinks: the captured dense gradients, one per target.
        transaction: the undo log of the update under way, if any.
    """

    def __init__(self, targets: list[SparseTarget], config: SparsityConfig, schedule: UpdateSchedule,
                 budget: int) -> None:
        self.targets = targets
        self.config = config
        self.schedule = schedule
        self.budget = budget
        self.step = 0
        self.update_index = 0
        self.optimizer: object = None
        self.sinks = [DenseGradient() for _ in targets]
        self.transaction: Transaction | None = None
        self.pruned = [0] * len(targets)
        self.grown = [0] * len(targets)
        self.dirty: set[int] = set()
        self.grown_indices: list[list[torch.Tensor]] = [[] for _ in targets]  # element indices activated
        self.written: set[int] = set()  # layers written since the last `take_written`
        self._counts: dict[int, tuple[TensorVersion, int]] = {}

    def active_groups(self, layer: int, exact: bool = False) -> int:
        """The active groups of `layer`, counted again only if its mask was written since it last was (other than
        through `set_indices`, which keeps the count; `exact`: count anyway)."""
        target = self.targets[layer]
        if target.sharded:  # (a shard at rest caches its own full counts)
            return target.active_groups()
        key = TensorVersion(target.mask)
        cached = self._counts.get(layer)
        if exact or cached is None or cached[0] != key:
            cached = self._counts[layer] = (key, target.active_groups())
        return cached[1]

    def take_written(self) -> set[int]:
        """The layers `set_indices` wrote since the last call."""
        written, self.written = self.written, set()
        return written

    seed = property(lambda self: self.config.seed, doc="The seed of every random draw.")
    target_sparsity = property(lambda self: self.config.sparsity, doc="The sparsity `apply` was asked for.")
    distribution = property(lambda self: self.config.distribution, doc="How the budget is split across layers.")
    total_steps = property(lambda self: self.config.total_steps, doc="The length of training, if given.")

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
            param = target.param
            state = optimizer_state_like(unwrap_optimizer(self.optimizer), param)
            tensors = [t for t in (param, param.grad, *state) if t is not None]
            cached = self._counts.get(layer) if not target.sharded else None
            known = cached is not None and cached[0] == TensorVersion(target.mask)
            target.write(indices, positions, active, tensors, self.transaction)
            self.dirty.add(layer)
            self.written.add(layer)
            if known:  # (every index changes state: the count moves by exactly `count`; recounted at the end)
                self._counts[layer] = (TensorVersion(target.mask), cached[1] + (count if active else -count))
            if active:
                self.grown_indices[layer].append(indices)
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

    def take_grown_indices(self) -> list[torch.Tensor]:
        """Per layer, the flat element indices activated since the last call (concatenated)."""
        taken = [torch.cat(i) if i else None for i in self.grown_indices]
        self.grown_indices = [[] for _ in self.targets]
        return taken
