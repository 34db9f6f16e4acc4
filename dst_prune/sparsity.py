"""`DynamicSparsity`: the controller that `dst_prune.apply` returns."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from . import stats
from .algorithms.base import SparseAlgorithm
from .bits import count_bits, pack_bits
from .distributed import broadcast_masks, check_sync, ignore_masks_in_ddp
from .errors import DSTError
from .gradients import DenseGradient, arm, disarm
from .masking import require_optimizer
from .schedules import UpdateSchedule
from .sparse_target import SparseTarget

__all__ = ["DynamicSparsity"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "dst_prune.DynamicSparsity/2"


class DynamicSparsity(stats.SparsityReports):
    """Keeps a model's number of active weights fixed while an algorithm moves them around.

    Created by `dst_prune.apply`. Call `step()` after every `optimizer.step()`; it reallocates when the
    schedule says so. Masks live on the model (`<name>_mask` buffers), so the model's own `state_dict`
    carries them; this object's `state_dict` carries the rest (step, update index, threshold, ...).

    Attributes:
        model: the model it controls.
        targets: the sparse parameters, in registration order.
        algorithm: the `SparseAlgorithm` doing the reallocation (`method=`).
        schedule: when to reallocate.
        optimizer: whose state is zeroed at pruned and regrown positions; may be set later.
        seed: the seed of every random draw.
        target_sparsity: the sparsity `apply` was asked for (gradual methods reach it at their stop step).
        distribution: how the budget is split across layers.
        total_steps: the length of training in optimizer steps, if given.
        step_count: optimizer steps counted by `step()`.
        update_index: reallocations done so far.
        budget: the number of active weights, kept exactly (gradual methods lower it on their schedule).
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
        self.schedule = schedule
        self.seed = seed
        self.budget = budget
        self.target_sparsity = target_sparsity
        self.distribution = distribution
        self.total_steps = total_steps
        self.config = dict(config or {})
        self.step_count = 0
        self.update_index = 0
        self.history: list[dict] = []
        self.ever_active = [pack_bits(t.mask) for t in targets]
        self.dense_gradient_sinks = [DenseGradient() for _ in targets]
        self._optimizer = None
        self.optimizer = optimizer
        self._changes = self._no_changes()
        self._dirty: set[int] = set()
        algorithm.bind(self)
        self._arm_dense_gradients(1)

    # --- configuration -------------------------------------------------------------------------
    @property
    def optimizer(self) -> object:
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: object) -> None:
        inner = require_optimizer(optimizer)
        if inner is not None:
            held = {id(p) for group in inner.param_groups for p in group["params"]}
            missing = [t.name for t in self.targets if id(t.orig) not in held]
            if missing:
                logger.warning("the optimizer does not hold %d sparse parameters (e.g. %s); their state "
                               "cannot be reset when they are pruned", len(missing), missing[0])
        self._optimizer = optimizer

    @property
    def method(self) -> str:
        return self.algorithm.name

    @property
    def decay_end(self) -> int | None:
        """The step at which decaying drop fractions reach zero: the stop step, else `total_steps`."""
        return self.schedule.stop_step if self.schedule.stop_step is not None else self.total_steps

    @property
    def n_sparse(self) -> int:
        """The number of parameters in the sparse tensors, zeros included."""
        return sum(t.numel for t in self.targets)

    @property
    def n_groups(self) -> int:
        """The number of groups the budget counts (the number of sparse parameters for `element`)."""
        return sum(t.n_groups for t in self.targets)

    @property
    def sparsity(self) -> float:
        """The measured global sparsity: the fraction of inactive weights among the sparse parameters."""
        return 1.0 - sum(t.active() for t in self.targets) / self.n_sparse

    # --- training-loop API ---------------------------------------------------------------------
    def step(self, skipped: bool = False) -> bool:
        """Count one optimizer step; reallocate if the schedule says so. Returns whether it did.

        Args:
            skipped: the optimizer step did not happen (fp16 loss-scale overflow): it is not counted and
                the dense gradient captured for it is discarded.
        """
        if skipped:
            for sink in self.dense_gradient_sinks:
                sink.take()
            return False
        self.step_count += 1
        self.algorithm.after_optimizer_step(self.step_count)
        updated = self.algorithm.is_update_step(self.step_count)
        if updated:
            self.reparameterize()
        self._arm_dense_gradients(self.step_count + 1)
        return updated

    def capture_dense_gradients(self, enable: bool = True) -> None:
        """Capture the dense gradient from the next backward on (`step()` arms it when the method needs it).

        Needed only to call `reparameterize()` by hand for a method that grows by gradient (RigL, GraNet).
        """
        if enable:
            arm(self.targets, self.dense_gradient_sinks)
        else:
            disarm(self.targets)

    def _arm_dense_gradients(self, step: int) -> None:
        needed = self.algorithm.needs_dense_gradient(step)
        self.capture_dense_gradients(needed)
        if not needed:
            for sink in self.dense_gradient_sinks:
                sink.take()

    def reparameterize(self) -> None:
        """One reallocation now (for DSR: prune by threshold, adjust it, reallocate)."""
        self._ensure_attached()
        self.algorithm.reparameterize()
        self._refresh_changed()
        self._finish_update()

    def prune_by_threshold(self) -> int:
        """DSR step 1: prune the active weights below the global threshold. Returns how many."""
        return self._dsr_step("prune_by_threshold")

    def adjust_pruning_threshold(self) -> float:
        """DSR step 2: double or halve the threshold. Returns the new threshold."""
        return self._dsr_step("adjust_pruning_threshold")

    def reallocate_free_parameters(self) -> int:
        """DSR step 3: regrow the freed budget in proportion to the survivors. Returns how many."""
        grown = self._dsr_step("reallocate_free_parameters")
        self._finish_update()
        return grown

    def _dsr_step(self, name: str) -> object:
        if self.method != "dsr":
            raise DSTError(f"{name}() is a step of method='dsr'; this controller runs method={self.method!r}. "
                           f"Call reparameterize() instead.")
        self._ensure_attached()
        result = getattr(self.algorithm, name)()
        self._refresh_changed()
        return result

    def prepare_for_ddp(self) -> None:
        """Call on every rank before wrapping the model in DDP (or `accelerator.prepare`).

        Gives every rank rank 0's masks (so ranks whose models were initialised differently still agree)
        and keeps DDP from re-broadcasting the masks at every forward. A no-op outside a distributed run,
        apart from the DDP setting.
        """
        broadcast_masks(self.targets)
        for target, ever in zip(self.targets, self.ever_active):
            with torch.no_grad():
                target.orig.masked_fill_(~target.mask, 0)
            target.refresh()
            ever.copy_(pack_bits(target.mask))
        ignore_masks_in_ddp(self.model, self.targets)

    def check_sync(self) -> bool:
        """Whether all ranks hold identical masks; raises RuntimeError if not. True outside DDP."""
        return check_sync(self.targets)

    # --- inspection (the tables and history are in stats.SparsityReports) ----------------------
    def named_sparse_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """`(name, parameter)` for each sparse tensor: `layer1.0.conv1.weight` and its `weight_orig`."""
        for t in self.targets:
            yield t.name, t.orig

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

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything besides the model's own tensors that an exact resume needs.

        Plain Python values, plus the `ever_active` masks and the algorithm's tensors (SNFS's momentum).
        """
        return {
            "format": STATE_FORMAT, "method": self.method, "targets": [t.name for t in self.targets],
            "sparsity": self.target_sparsity, "granularity": self.config.get("granularity", "element"),
            "budget": self.budget, "seed": self.seed,
            "step_count": self.step_count, "update_index": self.update_index,
            "schedule": self.schedule.state_dict(), "algorithm": self.algorithm.state_dict(),
            "ever_active": [m.clone() for m in self.ever_active], "config": dict(self.config),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; the model's state (weights, masks) is loaded separately."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DSTError(f"state is not a DynamicSparsity.state_dict() (format {STATE_FORMAT!r}).")
        if state["method"] != self.method:
            raise DSTError(f"state was saved by method={state['method']!r}; this controller runs "
                           f"method={self.method!r}. Call dst_prune.apply with method={state['method']!r}.")
        names = [t.name for t in self.targets]
        if state["targets"] != names:
            differ = sorted(set(state["targets"]) ^ set(names))[:5] or ["(same names, other order)"]
            raise DSTError(f"state was saved for other sparse tensors (differ: {', '.join(differ)}). Apply "
                           f"with the same include/exclude/dense_stem_and_head as the saved run.")
        if state["sparsity"] != self.target_sparsity:
            raise DSTError(f"state was saved by a run at sparsity={state['sparsity']}; this controller targets "
                           f"sparsity={self.target_sparsity}. Apply with the saved run's sparsity.")
        granularity = self.config.get("granularity", "element")
        if state["granularity"] != granularity:
            raise DSTError(f"state was saved by a run with granularity={state['granularity']!r}; this controller "
                           f"has granularity={granularity!r}. Apply with the saved run's granularity.")
        self.seed, self.step_count, self.update_index = state["seed"], state["step_count"], state["update_index"]
        self.budget = state["budget"]
        self.schedule = UpdateSchedule(**state["schedule"])
        self.algorithm.load_state_dict(state["algorithm"])
        for mine, saved in zip(self.ever_active, state["ever_active"]):
            mine.copy_(saved)
        self.history = list(state["history"])
        self._arm_dense_gradients(self.step_count + 1)

    # --- bookkeeping shared with the algorithms ------------------------------------------------
    def _no_changes(self) -> dict[str, list[int]]:
        return {"pruned": [0] * len(self.targets), "grown": [0] * len(self.targets)}

    def record_change(self, layer: int, *, pruned: int = 0, grown: int = 0) -> None:
        """Called by the algorithms for every prune/grow; summarised in `history` at the end of the update."""
        self._changes["pruned"][layer] += pruned
        self._changes["grown"][layer] += grown
        if pruned or grown:
            self._dirty.add(layer)

    def _refresh_changed(self) -> None:
        """Recompute the effective weights of the tensors whose masks changed (once per tensor per step)."""
        for layer in sorted(self._dirty):
            self.targets[layer].refresh()
        self._dirty.clear()

    def _finish_update(self) -> None:
        active = [t.active_groups() for t in self.targets]
        if sum(active) != self.budget:
            raise RuntimeError(f"dst_prune bug: {sum(active)} active weights after update "
                               f"{self.update_index} of {self.method}, expected exactly {self.budget}")
        for ever, target in zip(self.ever_active, self.targets):
            ever.bitwise_or_(pack_bits(target.mask))
        ever_active = sum(count_bits(e) for e in self.ever_active)
        self.history.append({"step": self.step_count, "update": self.update_index, "active": active,
                             **self._changes, "churn": sum(self._changes["grown"]) / max(1, self.budget),
                             "itop": ever_active / self.n_sparse, **self.algorithm.metrics()})
        logger.debug("update %d at step %d: %d pruned, %d grown", self.update_index, self.step_count,
                     sum(self._changes["pruned"]), sum(self._changes["grown"]))
        self._changes = self._no_changes()
        self.update_index += 1

    def _ensure_attached(self) -> None:
        detached = [t.name for t in self.targets if not t.attached]
        if detached:
            raise DSTError(f"the masks of {detached[0]} (and {len(detached) - 1} more) were removed, e.g. by "
                           f"dst_prune.remove(model); this controller no longer applies. Call dst_prune.apply "
                           f"again to train sparse.")
