"""`DynamicSparsity`: the controller that `dst_prune.apply` returns."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from . import stats
from .algorithms.base import SparseAlgorithm
from .bits import count_bits, pack_bits
from .context import SparsityContext, Transaction
from .controller_state import ControllerState, MaskCountCheck
from .copies import ModelCopies
from .distributed import broadcast_masks, check_sync, ignore_masks_in_ddp, mask_digest
from .errors import DSTError
from .gradients import arm, disarm
from .masked_weight import zero_outside
from .optimizer_state import optimizer_state_like, require_optimizer, unwrap_optimizer
from .schedules import UpdateSchedule
from .sharding import GatherScope, is_dtensor, local_tensor, refuse_fsdp1
from .sparse_target import SparseTarget
from .validation import check_int

__all__ = ["DynamicSparsity"]

logger = logging.getLogger(__name__)


class DynamicSparsity(ControllerState, ModelCopies, stats.SparsityReports):
    """Keeps a model's number of active weights fixed while an algorithm moves them around.

    Created by `dst_prune.apply`. Call `step()` after every `optimizer.step()`; it reallocates when the
    schedule says so. The model's own `state_dict` is plain (zeros in place, no masks); this object's
    `state_dict` carries the masks and everything else an exact resume needs.

    Every update is a transaction: it checks the mask count first, records each change, and if anything
    fails (or is interrupted) halfway, it puts masks, weights, gradients, optimizer state and its own
    counters back exactly as they were before raising.

    Attributes:
        model: the model it controls.
        targets: the sparse parameters, in registration order.
        algorithm: the `SparseAlgorithm` doing the reallocation (`method=`).
        context: what the algorithm sees (`SparsityContext`): budget, step, seed, schedule, ...
        ever_active: per tensor, the positions that were ever active (in-time over-parameterization),
            bit-packed (`bits.pack_bits`: 1 bit per weight).
        history: one record per reallocation: step, per-layer active/pruned/grown counts, churn (the
            fraction of the active weights that are new), `itop` (the fraction of sparse weights ever
            active, Liu et al. 2021) and the algorithm's own metrics (threshold, drop fraction, ...).
    """

    def __init__(self, model: nn.Module, targets: list[SparseTarget], algorithm: SparseAlgorithm, *,
                 schedule: UpdateSchedule, seed: int, budget: int, target_sparsity: float,
                 distribution: str, total_steps: int | None = None, optimizer: object = None,
                 config: dict | None = None) -> None:
        self.model = model
        self.targets = targets
        self.algorithm = algorithm
        self.context = SparsityContext(targets, seed=seed, schedule=schedule, target_sparsity=target_sparsity,
                                       distribution=distribution, total_steps=total_steps, budget=budget)
        self.config = dict(config or {})
        self.history: list[dict] = []
        self.ever_active = [pack_bits(t.mask) for t in targets]
        self._copies: list = []  # weak references to copies of the model (`add_copy`)
        self._decision: int | None = None  # FSDP2: the digest of the full masks this rank last decided
        #: FSDP2: the most bytes of gathered full tensors the last update held at once (a diagnostic)
        self.last_gathered_bytes = 0
        self.optimizer = optimizer
        algorithm.bind(self.context)
        model._register_load_state_dict_pre_hook(MaskCountCheck(self), with_module=True)
        self._arm_dense_gradients(1)

    # --- configuration (most of it lives in the context the algorithm sees) -----------------------
    @property
    def optimizer(self) -> object:
        return self.context.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: object) -> None:
        inner = require_optimizer(optimizer)
        self._sync_sharding()
        if inner is not None:
            held = {id(p) for group in inner.param_groups for p in group["params"]}
            missing = [t.name for t in self.targets if id(t.orig) not in held]
            if missing:
                logger.warning("the optimizer does not hold %d sparse parameters (e.g. %s); their state "
                               "cannot be reset when they are pruned", len(missing), missing[0])
            track = getattr(inner, "track_sparse_targets", None)  # dst_prune.optim: state over active weights only
            if callable(track):
                track(self.targets)
        self.context.optimizer = optimizer

    method = property(lambda self: self.algorithm.name, doc="The method's registered name.")
    budget = property(lambda self: self.context.budget, doc="The exact number of active groups (weights).")
    step_count = property(lambda self: self.context.step, doc="Optimizer steps counted by `step()`.")
    update_index = property(lambda self: self.context.update_index, doc="Reallocations done so far.")
    seed = property(lambda self: self.context.seed, doc="The seed of every random draw.")
    schedule = property(lambda self: self.context.schedule, doc="When reallocations happen.")
    target_sparsity = property(lambda self: self.context.target_sparsity, doc="The sparsity apply was asked for.")
    distribution = property(lambda self: self.context.distribution, doc="How the budget is split across layers.")
    total_steps = property(lambda self: self.context.total_steps, doc="The length of training, if given.")
    decay_end = property(lambda self: self.context.decay_end, doc="Where decaying drop fractions reach zero.")
    n_groups = property(lambda self: self.context.n_groups, doc="The number of groups the budget counts.")
    dense_gradient_sinks = property(lambda self: self.context.sinks, doc="The captured dense gradients.")

    @property
    def n_sparse(self) -> int:
        """The number of parameters in the sparse tensors, zeros included."""
        return sum(t.numel for t in self.targets)

    @property
    def sparsity(self) -> float:
        """The measured global sparsity: the fraction of inactive weights among the sparse parameters."""
        return 1.0 - sum(t.active() for t in self.targets) / self.n_sparse

    def set_total_steps(self, total_steps: int) -> None:
        """Give the length of training once it is known (a trainer computes it when training starts).

        The stop step follows from it as in `apply` (`stop_fraction`, or the method's default), unless
        `apply` was given an explicit `stop_step`.

        Raises:
            DSTError: not a positive integer, a schedule the method cannot run, or training already started
                with another length.
        """
        total_steps = check_int(total_steps, "total_steps", minimum=1, what="a number of optimizer steps")
        context = self.context
        if context.step and total_steps != context.total_steps:
            raise DSTError(f"total_steps={total_steps}, but training already ran {context.step} steps with "
                           f"total_steps={context.total_steps}; set it before the first step.")
        stop = self.config.get("stop_step")
        fraction = self.config.get("stop_fraction") or self.algorithm.default_stop_fraction
        if stop is None and fraction is not None:
            stop = max(1, round(fraction * total_steps))
        schedule = UpdateSchedule(update_every=context.schedule.update_every, stop_step=stop,
                                  double_at=context.schedule.double_at)
        self.algorithm.check_schedule(schedule)
        context.schedule, context.total_steps = schedule, total_steps
        self._arm_dense_gradients(context.step + 1)

    # --- training-loop API ---------------------------------------------------------------------
    def step(self, skipped: bool = False) -> bool:
        """Count one optimizer step; reallocate if the schedule says so. Returns whether it did.

        Args:
            skipped: the optimizer step did not happen (fp16 loss-scale overflow): it is not counted and
                the dense gradient captured for it is discarded.
        """
        if skipped:
            for sink in self.context.sinks:
                sink.take()
            return False
        if self._sync_sharding(quick=True) or self.targets[0].sharded:  # (all sharded, or none)
            for target in self.targets:  # (shards: keep the weights zero outside the masks, as the forward does)
                target.refresh()
        step = self.context.step + 1
        updated = self.algorithm.is_update_step(step)
        if updated:
            self._ensure_ready()  # validate before anything changes
        self.context.step = step
        try:
            self.algorithm.after_optimizer_step(step)
            if updated:
                self._transaction(self.algorithm.reparameterize, begins=True, ends=True)
        except BaseException:
            self.context.step = step - 1
            raise
        self._arm_dense_gradients(step + 1)
        return updated

    def capture_dense_gradients(self, enable: bool = True) -> None:
        """Capture the dense gradient from the next backward on (`step()` arms it when the method needs it).

        Needed only to call `reparameterize()` by hand for a method that grows by gradient (RigL, GraNet).
        """
        if enable:
            arm(self.targets, self.context.sinks)
        else:
            disarm(self.targets)

    def _arm_dense_gradients(self, step: int) -> None:
        needed = self.algorithm.needs_dense_gradient(step)
        self.capture_dense_gradients(needed)
        if not needed:
            for sink in self.context.sinks:
                sink.take()

    def reparameterize(self) -> None:
        """One reallocation now (for DSR: prune by threshold, adjust it, reallocate)."""
        self._ensure_ready()
        self._transaction(self.algorithm.reparameterize, begins=True, ends=True)

    def prune_by_threshold(self) -> int:
        """DSR step 1: prune the active weights below the global threshold. Returns how many."""
        self._ensure_ready()
        return self._transaction(self._stepwise("prune_by_threshold"), begins=True, ends=False)

    def adjust_pruning_threshold(self) -> float:
        """DSR step 2: double or halve the threshold. Returns the new threshold."""
        return self._transaction(self._stepwise("adjust_pruning_threshold"), begins=False, ends=False)

    def reallocate_free_parameters(self) -> int:
        """DSR step 3: regrow the freed budget in proportion to the survivors. Returns how many."""
        return self._transaction(self._stepwise("reallocate_free_parameters"), begins=False, ends=True)

    def _stepwise(self, name: str) -> Callable[[], object]:
        step = getattr(self.algorithm, name, None)
        if step is None:
            raise DSTError(f"{name}() is a step of method='dsr'; this controller runs method={self.method!r}. "
                           f"Call reparameterize() instead.")
        return step

    def _transaction(self, update: Callable[[], object], *, begins: bool, ends: bool) -> object:
        """Run (part of) an update; on any exception undo every change it made, then re-raise."""
        with self._gathered():
            return self._transaction_body(update, begins=begins, ends=ends)

    def _transaction_body(self, update: Callable[[], object], *, begins: bool, ends: bool) -> object:
        context = self.context
        saved = (context.budget, self.algorithm.snapshot(), len(self.history))
        transaction = context.transaction = Transaction()
        try:
            if begins:
                context.budget = self.algorithm.next_budget()
            result = update()
            context.refresh_changed()
            if ends:
                self._finish_update()
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

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[None]:
        """While an update runs, sharded targets show their full tensors (`dst_prune.sharding.GatherScope`)."""
        if not any(t.sharded for t in self.targets):
            yield
            return
        scope = GatherScope()
        for target in self.targets:
            target.scope = scope
        try:
            yield
        finally:
            try:
                self._decision = mask_digest(self.targets)
                self.last_gathered_bytes = scope.peak_bytes
            finally:
                for target in self.targets:
                    if id(target) in scope.masks:
                        target.cache_counts(scope.masks[id(target)])
                    target.scope = None

    def _sync_sharding(self, quick: bool = False) -> bool:
        """Shard the masks of parameters FSDP2 sharded since (`SparseTarget.shard_mask`). Returns whether any.

        Refuses FSDP1 (`FullyShardedDataParallel`), whose flat parameters cannot be masked in place. `quick`
        (every `step()`) looks at the first sparse tensor only; every update and hand-over checks them all.
        """
        first = self.targets[0]
        if quick and (first.sharded or (first.attached and not is_dtensor(first.param)
                                        and isinstance(first.param, nn.Parameter))):
            return False
        for target in self.targets:
            refuse_fsdp1(target.module, target.tensor_name, target.name)
        if not any(t.attached and not t.sharded and is_dtensor(t.param) for t in self.targets):
            return False
        self._refuse_mixed_sharding()
        self._decision = mask_digest(self.targets)  # the full masks, still replicated: no collective
        for target in self.targets:
            target.shard_mask()
        logger.info("dst_prune: %d sparse tensors are sharded (FSDP2); their masks now hold each rank's shard",
                    sum(t.sharded for t in self.targets))
        return True

    def _refuse_mixed_sharding(self) -> None:
        plain = [t.name for t in self.targets if not is_dtensor(t.param)]
        if plain:
            raise DSTError(f"{plain[0]} (and {len(plain) - 1} more sparse tensors) is not sharded while others are: "
                           f"apply fully_shard to every block that holds sparse weights and then to the root model "
                           f"(fully_shard(block) for each block, then fully_shard(model)) before training.")

    def _ensure_ready(self) -> None:
        """Refuse an update the masks cannot take: removed masks, or a count other than the budget."""
        self._sync_sharding()
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

    def _finish_update(self) -> None:
        context = self.context
        active = [t.active_groups() for t in self.targets]
        if sum(active) != context.budget:
            raise RuntimeError(f"dst_prune bug: {sum(active)} active weights after update {context.update_index} "
                               f"of {self.method}, expected exactly {context.budget}")
        pruned, grown = context.take_changes()
        for ever, target in zip(self.ever_active, self.targets):
            ever.bitwise_or_(pack_bits(target.mask))
        ever_active = sum(count_bits(e) for e in self.ever_active)
        self.history.append({"step": context.step, "update": context.update_index, "active": active,
                             "pruned": pruned, "grown": grown, "churn": sum(grown) / max(1, context.budget),
                             "itop": ever_active / self.n_sparse, **self.algorithm.metrics()})
        logger.debug("update %d at step %d: %d pruned, %d grown", context.update_index, context.step, sum(pruned),
                     sum(grown))
        context.update_index += 1
        self.sync_copies()

    # --- distributed ---------------------------------------------------------------------------
    def prepare_for_ddp(self) -> None:
        """Call on every rank before wrapping the model in DDP (or `accelerator.prepare`).

        Gives every rank rank 0's masks (so ranks whose models were initialised differently still agree)
        and keeps DDP from re-broadcasting the masks at every forward. A no-op outside a distributed run,
        apart from the DDP setting.
        """
        broadcast_masks(self.targets)
        for target, ever in zip(self.targets, self.ever_active):
            with torch.no_grad():
                zero_outside(target.orig, target.mask)
            target.refresh()
            ever.copy_(pack_bits(target.mask))
        ignore_masks_in_ddp(self.model, self.targets)
        self.sync_copies()

    def check_sync(self) -> bool:
        """Whether all ranks hold identical masks; raises RuntimeError if not. True outside DDP.

        Sharded (FSDP2): whether every rank decided the same full masks at the last update and the shards
        together make exactly those masks (gathers each mask once: call it on every rank).
        """
        self._sync_sharding()
        if any(t.sharded for t in self.targets):
            return check_sync(self.targets, decision=self._decision)
        return check_sync(self.targets)

    def _reset_outside_masks(self) -> None:
        """Zero weights, gradients and optimizer state outside the masks (after masks were replaced)."""
        optimizer = unwrap_optimizer(self.optimizer)
        with torch.no_grad():
            for target in self.targets:
                param = target.param
                for tensor in (param, param.grad, *optimizer_state_like(optimizer, param)):
                    if tensor is not None:
                        zero_outside(local_tensor(tensor), target.buffer_mask)
                target.refresh()

    # --- inspection (the tables and history are in stats.SparsityReports) ----------------------
    def named_sparse_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """`(name, parameter)` for each sparse tensor: `layer1.0.conv1.weight` and its `weight_orig`."""
        for t in self.targets:
            yield t.name, t.param

    def sparse_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable `weight_orig` parameters of the sparse tensors."""
        for _, param in self.named_sparse_parameters():
            yield param

    def masks(self) -> dict[str, torch.Tensor]:
        """`{name: bool mask}` (the live buffers; do not write them)."""
        return {t.name: t.mask for t in self.targets}

    def __repr__(self) -> str:
        return (f"DynamicSparsity(method={self.method!r}, sparsity={self.sparsity:.4f}, "
                f"tensors={len(self.targets)}, step={self.step_count}, updates={self.update_index})")
