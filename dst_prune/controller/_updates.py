"""Updates as transactions: the step count, the checks before an update, the undo log, the history record.

An update validates first (the masks hold exactly the budget; the method can start), then runs the
algorithm with every mask write recorded (`dst_prune._masking.transaction`). If anything fails or is
interrupted halfway, masks, weights, gradients, optimizer state, the budget, the algorithm's own
attributes and the history are put back exactly, and the error is raised again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .._bits import count_bits, pack_bits
from .._masking.target import SparseTarget
from .._masking.transaction import Transaction
from ..algorithms.base import SparseAlgorithm
from ..algorithms.context import SparsityContext
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
        active = sum(t.active_groups() for t in self.targets)
        if active != self.context.budget:
            raise DSTError(f"the model's masks hold {active} active weights (groups) but this controller keeps "
                           f"exactly {self.context.budget}: masks were loaded or written without the controller "
                           f"state that goes with them. Load the matching dst.load_state_dict(...) first.")

    def _transaction(self, update: Callable[[], object], *, begins: bool, ends: bool) -> object:
        with self.sharding.gathered(self.targets):
            context = self.context
            saved = (context.budget, self.algorithm.snapshot(), len(self.history))
            transaction = context.transaction = Transaction()
            try:
                if begins:
                    context.budget = self.algorithm.next_budget()
                result = update()
                context.refresh_changed()
                if ends:
                    self._finish()
                return result
            except BaseException:
                transaction.undo()
                context.budget, snapshot, length = saved
                self.algorithm.restore(snapshot)
                del self.history[length:]
                context.take_changes()
                context.dirty.clear()
                raise
            finally:
                context.transaction = None

    def _finish(self) -> None:
        """Check the exact count, record the update in the history, sync the copies. Fails before it changes."""
        context = self.context
        active = [t.active_groups() for t in self.targets]
        if sum(active) != context.budget:
            raise RuntimeError(f"dst_prune bug: {sum(active)} active weights after update {context.update_index} "
                               f"of {self.algorithm.name}, expected exactly {context.budget}")
        metrics = dict(self.algorithm.metrics())  # (a method's own code: may raise; nothing changed yet)
        refuse_objects(metrics, f"method={self.algorithm.name!r}'s metrics()")
        packed = [pack_bits(t.mask) for t in self.targets]
        self.copies.sync()
        pruned, grown = context.take_changes()
        for ever, mask in zip(self.ever_active, packed):
            ever.bitwise_or_(mask)
        ever_active = sum(count_bits(e) for e in self.ever_active)
        n_sparse = sum(t.numel for t in self.targets)
        self.history.append({"step": context.step, "update": context.update_index, "active": active,
                             "pruned": pruned, "grown": grown, "churn": sum(grown) / max(1, context.budget),
                             "itop": ever_active / n_sparse, **metrics})
        logger.debug("update %d at step %d: %d pruned, %d grown", context.update_index, context.step, sum(pruned),
                     sum(grown))
        context.update_index += 1
