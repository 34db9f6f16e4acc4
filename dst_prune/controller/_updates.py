"""Updates as transactions: the step count, the checks before an update, the undo log, the history record.

An update validates first (the masks hold exactly the budget; the method can start), then runs the
algorithm with every mask write recorded (`dst_prune._masking.transaction`). If anything fails or is
interrupted halfway, masks, weights, gradients, optimizer state, the budget, the algorithm's own
attributes and the history are put back exactly, and the error is raised again.

What it costs beyond the method's own work: the count of every mask is remembered with the mask's
version (`Tensor._version`, which every in-place write bumps, as `masked_weight` relies on too), so a
mask is counted again only after something wrote it; the ever-active bits of a tensor are packed and
counted again only when its mask (or they) changed since the last update. An update runs with at most one
intra-op thread per `UPDATE_GRAIN` weights of the largest tensor (`dst_prune._threads`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .._bits import count_bits, pack_bits
from .._masking.target import SparseTarget
from .._masking.transaction import Transaction
from .._threads import UPDATE_GRAIN, threads_for
from .._validation import check_int
from ..algorithms.base import SparseAlgorithm
from ..algorithms.context import SparsityContext, TensorVersion
from ..distributed.sharded import Sharding
from ..errors import DSTError
from ._copies import ModelCopies
from ._state import refuse_objects

__all__ = ["Updates"]

logger = logging.getLogger(__name__)


class Updates:
    """Runs the algorithm's updates on the controller's parts.

    Args:
        targets, context, algorithm: the controller's sparse tensors, the algorithm's context, the algorithm.
        sharding: the controller's FSDP2 side (full tensors gathered while an update runs).
        copies: the model copies to sync after each update.
        ever_active: per tensor, the packed positions ever active (updated in place).
        history: the controller's history (appended in place).
    """

    def __init__(self, targets: list[SparseTarget], context: SparsityContext, algorithm: SparseAlgorithm,
                 sharding: Sharding, copies: ModelCopies, ever_active: list, history: list[dict]) -> None:
        self.targets, self.context, self.algorithm = targets, context, algorithm
        self.sharding, self.copies, self.ever_active, self.history = sharding, copies, ever_active, history
        self._merged: dict[int, tuple] = {}  # layer -> (mask, bits) versions when the mask was last merged
        self._bits: dict[int, tuple[TensorVersion, int]] = {}  # layer -> (bits' version, set bits)
        self._largest = max((t.numel for t in targets), default=0)

    def step(self) -> bool:
        """Count one optimizer step and reallocate if the schedule says so. Returns whether it did."""
        context = self.context
        step = context.step + 1
        updated = self.algorithm.is_update_step(step)
        if updated:
            self.ensure_ready()  # validate before anything changes
        context.step = step
        try:
            self.algorithm.after_optimizer_step(step)
            if updated:
                self._transaction(self.algorithm.reparameterize, begins=True, ends=True)
        except BaseException:
            context.step = step - 1
            raise
        return updated

    def set_total_steps(self, total_steps: int) -> None:
        """`DynamicSparsity.set_total_steps`: the configuration and the schedule for a new length of training,
        checked by the algorithm first; a change after training started is logged."""
        context = self.context
        total_steps = check_int(total_steps, "total_steps", minimum=1, what="a number of optimizer steps")
        config = context.config.with_total_steps(total_steps)
        schedule = config.schedule(self.algorithm.default_stop_fraction)
        self.algorithm.check_schedule(schedule)
        if context.step and total_steps != context.config.total_steps:
            logger.warning("dst_prune: the length of training changes from %s to %d optimizer steps at step %d; the "
                           "schedule (stop step %s, decays) follows the new length from now on",
                           context.config.total_steps, total_steps, context.step, schedule.stop_step)
        context.config, context.schedule = config, schedule

    def run(self, update: Callable[[], object], *, begins: bool, ends: bool) -> object:
        """Run (part of) an update by hand (`reparameterize`, DSR's three steps), validated first when it begins."""
        if begins:
            self.ensure_ready()
        return self._transaction(update, begins=begins, ends=ends)

    def stepwise(self, name: str) -> Callable[[], object]:
        """The algorithm's own step `name` (DSR's), or a DSTError saying to call `reparameterize`."""
        step = getattr(self.algorithm, name, None)
        if step is None:
            raise DSTError(f"{name}() is a step of method='dsr'; this controller runs method="
                           f"{self.algorithm.name!r}. Call reparameterize() instead.")
        return step

    def ensure_ready(self) -> None:
        """Refuse an update the masks cannot take: removed masks, or a count other than the budget."""
        self.sharding.sync(self.targets)
        for target in self.targets:
            target.hook.check_matched(target.module, "an update")
        self.algorithm.check_ready()
        detached = [t.name for t in self.targets if not t.attached]
        if detached:
            raise DSTError(f"the masks of {detached[0]} (and {len(detached) - 1} more) were removed, e.g. by "
                           f"dst_prune.remove(model); this controller no longer applies. Call dst_prune.apply "
                           f"again to train sparse.")
        active = sum(self.context.active_groups(layer) for layer in range(len(self.targets)))
        if active != self.context.budget:
            raise DSTError(f"the model's masks hold {active} active weights (groups) but this controller keeps "
                           f"exactly {self.context.budget}: masks were loaded or written without the controller "
                           f"state that goes with them. Load the matching dst.load_state_dict(...) first.")

    def _transaction(self, update: Callable[[], object], *, begins: bool, ends: bool) -> object:
        device = self.targets[0].mask.device if self.targets else torch.device("cpu")
        with self.sharding.gathered(self.targets), threads_for(self._largest, device, UPDATE_GRAIN):
            context = self.context
            saved = (context.budget, self.algorithm.snapshot(), len(self.history))
            transaction = context.transaction = Transaction()
            context.take_grown_indices()
            if begins:  # (DSR's steps: the layers its first step wrote are counted exactly at the end too)
                context.take_written()
            merged = [self._is_merged(layer) for layer in range(len(self.targets))]
            try:
                if begins:
                    context.budget = self.algorithm.next_budget()
                result = update()
                context.refresh_changed()
                if ends:
                    self._finish(merged)
                return result
            except BaseException:
                transaction.undo()
                context.budget, snapshot, length = saved
                self.algorithm.restore(snapshot)
                del self.history[length:]
                context.take_changes()
                context.take_grown_indices()
                context.take_written()
                context.dirty.clear()
                raise
            finally:
                context.transaction = None

    def _is_merged(self, layer: int) -> bool:
        """Whether the ever-active bits of `layer` hold its mask as it is now (nothing wrote either since)."""
        target = self.targets[layer]
        return not target.sharded and self._merged.get(layer) == (TensorVersion(target.mask),
                                                                  TensorVersion(self.ever_active[layer]))

    def _finish(self, merged: list[bool]) -> None:
        """Check the exact count, record the update in the history, sync the copies. Fails before it changes.

        `merged[layer]`: whether the ever-active bits held the mask of `layer` when the update began; then only
        the positions the update activated are added to them (else the whole mask is packed and merged).
        """
        context = self.context
        written = context.take_written()  # (counted exactly: the check below is of what was written)
        active = [context.active_groups(layer, exact=layer in written) for layer in range(len(self.targets))]
        if sum(active) != context.budget:
            raise RuntimeError(f"dst_prune bug: {sum(active)} active weights after update {context.update_index} "
                               f"of {self.algorithm.name}, expected exactly {context.budget}")
        metrics = dict(self.algorithm.metrics())  # (a method's own code: may raise; nothing changed yet)
        refuse_objects(metrics, f"method={self.algorithm.name!r}'s metrics()")
        grown_indices = context.take_grown_indices()
        packed = {layer: pack_bits(t.mask) for layer, t in enumerate(self.targets) if not merged[layer]}
        self.copies.sync()
        pruned, grown = context.take_changes()
        for layer, (target, ever) in enumerate(zip(self.targets, self.ever_active)):
            if layer in packed:
                ever.bitwise_or_(packed[layer])
            elif grown_indices[layer] is not None:
                self._set_bits(layer, grown_indices[layer])
            self._merged[layer] = (TensorVersion(target.mask), TensorVersion(ever))
        ever_active = sum(self._count_bits(layer) for layer in range(len(self.targets)))
        n_sparse = sum(t.numel for t in self.targets)
        self.history.append({"step": context.step, "update": context.update_index, "active": active,
                             "pruned": pruned, "grown": grown, "churn": sum(grown) / max(1, context.budget),
                             "itop": ever_active / n_sparse, **metrics})
        logger.debug("update %d at step %d: %d pruned, %d grown", context.update_index, context.step, sum(pruned),
                     sum(grown))
        context.update_index += 1

    def _set_bits(self, layer: int, indices: torch.Tensor) -> None:
        """Set the ever-active bits of `layer` at the flat `indices` (O(len(indices)), the count kept up to date)."""
        ever = self.ever_active[layer]
        indices = indices.to(ever.device)
        clear = (ever.index_select(0, indices >> 3) >> (indices & 7).to(torch.uint8)).bitwise_and_(1) == 0
        fresh = indices[clear]
        if fresh.numel() > 1 and not bool((fresh[1:] > fresh[:-1]).all()):
            fresh = torch.unique(fresh)  # (a position listed twice must be added once)
        cached = self._bits.get(layer)
        valid = cached is not None and cached[0] == TensorVersion(ever)
        bits = torch.ones(fresh.shape, dtype=torch.uint8, device=ever.device) << (fresh & 7).to(torch.uint8)
        ever.index_add_(0, fresh >> 3, bits)  # distinct bits, none set yet: their sum is their OR
        if valid:
            self._bits[layer] = (TensorVersion(ever), cached[1] + fresh.numel())

    def _count_bits(self, layer: int) -> int:
        """The ever-active positions of `layer`, counted again only if its bits changed since they last were."""
        ever = self.ever_active[layer]
        key = TensorVersion(ever)
        cached = self._bits.get(layer)
        if cached is None or cached[0] != key:
            cached = self._bits[layer] = (key, count_bits(ever))
        return cached[1]
