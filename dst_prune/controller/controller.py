"""`DynamicSparsity`: the controller that `dst_prune.apply` returns.

It is composed of small parts, each in its own module: the algorithm and the `SparsityContext` it works on
(`dst_prune.algorithms`), the update transactions (`_updates`), the checkpoint codec (`_state`), the model
copies that follow its masks (`_copies`), the FSDP2 side (`dst_prune.distributed.fsdp.Sharding`) and the
reports (`dst_prune.reports`). Every public method is written here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from prettytable import PrettyTable
from torch import nn

from .._bits import pack_bits
from .._masking.gradients import arm, disarm
from .._masking.target import SparseTarget
from .._optimizer_state import adopt_optimizer
from ..algorithms.base import SparseAlgorithm
from ..algorithms.context import SparsityContext
from ..config import SparsityConfig
from ..distributed.ddp import check_sync, prepare_for_ddp
from ..distributed.sharded import Sharding
from ..reports.history import plot_history, save_history_csv
from ..reports.tables import stats_table, sum_table
from ._copies import ModelCopies
from ._restore import restore
from ._state import build_state, check_state, check_weights
from ._updates import Updates

__all__ = ["DynamicSparsity"]


class DynamicSparsity:
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
        context: what the algorithm sees (`SparsityContext`): budget, step, schedule, optimizer, ...
        ever_active: per tensor, the positions that were ever active (in-time over-parameterization),
            bit-packed (1 bit per weight).
        history: one record per reallocation: step, per-layer active/pruned/grown counts, churn (the
            fraction of the active weights that are new), `itop` (the fraction of sparse weights ever
            active, Liu et al. 2021) and the algorithm's own metrics (threshold, drop fraction, ...).
    """

    def __init__(self, model: nn.Module, targets: list[SparseTarget], algorithm: SparseAlgorithm,
                 config: SparsityConfig, *, budget: int, optimizer: object = None) -> None:
        self.model = model
        self.targets = targets
        self.algorithm = algorithm
        self.context = SparsityContext(targets, config, config.schedule(algorithm.default_stop_fraction), budget)
        self.history: list[dict] = []
        self.ever_active = [pack_bits(t.mask) for t in targets]
        self._copies = ModelCopies(targets)
        self._sharding = Sharding()
        self._updates = Updates(targets, self.context, algorithm, self._sharding, self._copies, self.ever_active,
                                self.history)
        algorithm.bind(self.context)
        self.optimizer = optimizer
        self._arm_dense_gradients(1)

    # --- configuration ---------------------------------------------------------------------------------
    @property
    def config(self) -> SparsityConfig:
        """The arguments `apply` was given, validated (`dst_prune.config.SparsityConfig`)."""
        return self.context.config

    @property
    def optimizer(self) -> object:
        """The optimizer whose state is zeroed where weights are pruned or regrown (settable)."""
        return self.context.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: object) -> None:
        self._sharding.sync(self.targets)
        adopt_optimizer(optimizer, self.targets)
        self.context.optimizer = optimizer

    method = property(lambda self: self.algorithm.name, doc="The method's registered name.")
    budget = property(lambda self: self.context.budget, doc="The exact number of active groups (weights).")
    step_count = property(lambda self: self.context.step, doc="Optimizer steps counted by `step()`.")
    update_index = property(lambda self: self.context.update_index, doc="Reallocations done so far.")
    seed = property(lambda self: self.config.seed, doc="The seed of every random draw.")
    schedule = property(lambda self: self.context.schedule, doc="When reallocations happen.")
    target_sparsity = property(lambda self: self.config.sparsity, doc="The sparsity apply was asked for.")
    distribution = property(lambda self: self.config.distribution, doc="How the budget is split across layers.")
    total_steps = property(lambda self: self.config.total_steps, doc="The length of training, if given.")
    decay_end = property(lambda self: self.context.decay_end, doc="Where decaying drop fractions reach zero.")
    n_groups = property(lambda self: self.context.n_groups, doc="The number of groups the budget counts.")
    dense_gradient_sinks = property(lambda self: self.context.sinks, doc="The captured dense gradients.")
    last_gathered_bytes = property(lambda self: self._sharding.last_gathered_bytes,
                                   doc="FSDP2: the most bytes of full tensors the last update gathered at once.")

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
        `apply` was given an explicit `stop_step`. Changing it after training started (a resumed run trained
        for longer) is allowed, as the resume rule allows (`dst_prune.config`), and logged: the schedule follows
        the new length from the current step on.

        Raises:
            DSTError: not a positive integer, or a schedule the method cannot run.
        """
        self._updates.set_total_steps(total_steps)
        self._arm_dense_gradients(self.context.step + 1)

    # --- training-loop API -----------------------------------------------------------------------------
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
        if self._sharding.sync(self.targets, quick=True) or self._sharding.active(self.targets):
            for target in self.targets:  # (shards: keep the weights zero outside the masks, as the forward does)
                target.refresh()
        else:  # the weights zero outside the masks now, not at the next forward (which then has nothing to do):
            for target in self.targets:  # a compiled forward reads them as they are (`CompiledMaskedWeight`)
                if target.attached:
                    target.hook.mask_orig(target.module)
        updated = self._updates.step()
        self._arm_dense_gradients(self.context.step + 1)
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
        self._updates.run(self.algorithm.reparameterize, begins=True, ends=True)

    def prune_by_threshold(self) -> int:
        """DSR step 1: prune the active weights below the global threshold. Returns how many."""
        return self._updates.run(self._updates.stepwise("prune_by_threshold"), begins=True, ends=False)

    def adjust_pruning_threshold(self) -> float:
        """DSR step 2: double or halve the threshold. Returns the new threshold."""
        return self._updates.run(self._updates.stepwise("adjust_pruning_threshold"), begins=False, ends=False)

    def reallocate_free_parameters(self) -> int:
        """DSR step 3: regrow the freed budget in proportion to the survivors. Returns how many."""
        return self._updates.run(self._updates.stepwise("reallocate_free_parameters"), begins=False, ends=True)

    # --- copies of the model (an EMA) --------------------------------------------------------------------
    def add_copy(self, module: nn.Module) -> None:
        """Keep a deep copy of the model (e.g. timm's `ModelEmaV3(...).module`) on this controller's masks.

        After every update (and `load_state_dict`, `prepare_for_ddp`) the copy's masks are set to the
        model's and its weights zeroed outside them, so an EMA never keeps decaying values at pruned
        positions. The copy is held weakly.
        """
        self._copies.add(module)

    def sync_copies(self) -> None:
        """Set every registered copy's masks to the model's, with zero weights outside them."""
        self._copies.sync()

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Masks (bit-packed, with a digest), budget, step, schedule, configuration, the algorithm's state,
        history: tensors and plain Python values only (`torch.load(weights_only=True)` reads it).

        Under FSDP2 it gathers the masks: call it on every rank.
        """
        self._sharding.sync(self.targets)
        return build_state(targets=self.targets, context=self.context, algorithm=self.algorithm,
                           ever_active=self.ever_active, history=self.history)

    def check_state_dict(self, state: dict) -> None:
        """Raise the `DSTError` that `load_state_dict(state)` would raise, without changing anything."""
        check_state(state, targets=self.targets, context=self.context, algorithm=self.algorithm)

    def check_weights(self, model_state: dict, state: dict) -> None:
        """Refuse a model state dict with non-zero weights outside the masks of controller `state` (saved apart).

        The weights of a sparse model are zero wherever its mask is, so a non-zero there means the two
        come from different steps or runs.
        """
        checked = check_state(state, targets=self.targets, context=self.context, algorithm=self.algorithm)
        check_weights(model_state, checked.masks, self.targets)

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`: masks, budget, step, the algorithm's state, history.

        Everything is checked before anything changes; on a `DSTError` the model and the controller are
        exactly as they were. The model's weights are loaded separately (`model.load_state_dict`), in
        either order. The resume rule (`dst_prune.config`): method, sparsity, granularity, distribution,
        seed and the sparse tensors must be the saved ones; the schedule, `total_steps` and the method's
        hyperparameters are this controller's (a difference is logged).
        """
        self._sharding.sync(self.targets)
        checked = check_state(state, targets=self.targets, context=self.context, algorithm=self.algorithm)
        restore(checked, targets=self.targets, context=self.context, algorithm=self.algorithm,
                ever_active=self.ever_active, history=self.history)
        self._sharding.loaded(self.targets, checked.masks or [])
        self._arm_dense_gradients(self.context.step + 1)
        self._copies.sync()

    # --- distributed -----------------------------------------------------------------------------------
    def prepare_for_ddp(self) -> None:
        """Call on every rank before wrapping the model in DDP (or `accelerator.prepare`).

        Gives every rank rank 0's masks (so ranks whose models were initialised differently still agree)
        and keeps DDP from re-broadcasting the masks at every forward. A no-op outside a distributed run,
        apart from the DDP setting.
        """
        prepare_for_ddp(self.model, self.targets, self.ever_active)
        self._copies.sync()

    def check_sync(self) -> bool:
        """Whether all ranks hold identical masks; raises RuntimeError if not. True outside DDP.

        Sharded (FSDP2): whether every rank decided the same full masks at the last update and the shards
        together make exactly those masks (gathers each mask once: call it on every rank).
        """
        self._sharding.sync(self.targets)
        if self._sharding.active(self.targets):
            return self._sharding.check_sync(self.targets)
        return check_sync(self.targets)

    # --- inspection and reports ------------------------------------------------------------------------
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

    @property
    def sum_table(self) -> PrettyTable:
        """`# total parameters | # sparse parameters | # dense parameters | # nonzero parameters in sparse |
        sparsity`."""
        return sum_table(self.model, self.targets)

    @property
    def stats_table(self) -> PrettyTable:
        """`Parameter tensor | # total | # nonzero | sparsity`, one row per sparse tensor."""
        return stats_table(self.targets)

    def save_history(self, path: str | Path) -> str:
        """Write the reallocation history as CSV (step, sparsity, churn, itop, per-layer density, ...)."""
        return str(save_history_csv(self.history, self.targets, path))

    def plot_history(self, path: str | Path) -> str:
        """Save a PNG of per-layer density, in-time over-parameterization and churn over training."""
        return str(plot_history(self.history, self.targets, path))

    def __repr__(self) -> str:
        return (f"DynamicSparsity(method={self.method!r}, sparsity={self.sparsity:.4f}, "
                f"tensors={len(self.targets)}, step={self.step_count}, updates={self.update_index})")
