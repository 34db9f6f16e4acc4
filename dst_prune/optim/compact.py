"""`CompactStateOptimizer`: the base of `dst_prune.optim.SGD`, `Adam` and `AdamW`.

A masked model only simulates sparsity: torch's optimizers keep a momentum (SGD) or two moments (Adam) for
every weight, zeros included. These optimizers keep the per-weight state of a sparse parameter as 1-D tensors
over its active weights only (plus an int32 index of where they are), and dense state for dense parameters.
At 90% sparsity that is 1.2 bytes of AdamW state per sparse weight instead of 8.

The update itself is torch's own functional one (`torch.optim.adam.adam`, `torch.optim.sgd.sgd`), run on the
gathered active weights, gradients and state, and scattered back; every operation is elementwise, so the
results equal torch's optimizer on the same masked model (zero gradient and zero state leave a weight
unchanged, which is why the positions outside the mask need no state).

The optimizer learns which parameters are sparse when it is handed to a controller (`dst_prune.apply(model,
..., optimizer=opt)`, `dst.optimizer = opt`, or a trainer callback doing the same), and finds each mask on its
module at every step. When the mask's contents changed since the state was laid out (after a controller update,
an undone update, or a controller `load_state_dict`), the state is remapped lazily at the next step: survivors
keep theirs, pruned entries go and grown entries start at zero (DESIGN.md rule 3 by construction).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..distributed.fsdp import is_dtensor
from ..errors import DSTError
from .in_backward import GradientFreeing
from .layout import SparseSlot, memory_order
from .state_io import check_state_dict, restore_indices, split_indices
from .views import INDICES, CompactViews, View

__all__ = ["CompactStateOptimizer"]

logger = logging.getLogger(__name__)

_FSDP2_FIX = ("dst_prune.optim keeps compact state for unsharded parameters only; under FSDP2 use torch's optimizer "
              "(torch.optim.AdamW etc.), whose state is sharded with the parameters.")


class CompactStateOptimizer(CompactViews, torch.optim.Optimizer):
    """A `torch.optim.Optimizer` whose per-weight state covers only the active weights of sparse parameters.

    Subclasses name their per-weight state tensors (`per_weight`), create them (`init_state`) and run torch's
    functional update on lists of tensors (`update`).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        defaults: the hyperparameters' defaults.
        free_gradients: step each parameter inside backward, as soon as its gradient is ready, and free the
            gradient (`dst_prune.optim.in_backward`).
    """

    def __init__(self, params: Iterable, defaults: dict, *, free_gradients: bool = False) -> None:
        if not isinstance(free_gradients, bool):
            raise DSTError(f"{type(self).__name__}: free_gradients must be True or False; received "
                           f"{free_gradients!r}.")
        self._slots: dict[torch.Tensor, SparseSlot] = {}
        self._freeing = GradientFreeing(self) if free_gradients else None
        super().__init__(params, defaults)

    # --- parameters ------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """`torch.optim.Optimizer.add_param_group`; refuses parameters sharded by FSDP2 (DTensors)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        sharded = [i for i, p in enumerate(group["params"]) if is_dtensor(p)]
        if sharded:
            self.param_groups.pop()
            names = group.get("param_names")
            what = repr(names[sharded[0]]) if names else f"parameter {sharded[0]} of the group"
            raise DSTError(f"{type(self).__name__}: {what} (and {len(sharded) - 1} more) is sharded (a DTensor, "
                           f"e.g. by FSDP2's fully_shard). {_FSDP2_FIX}")
        if self._freeing is not None:
            self._freeing.watch(group["params"])

    def track_sparse_targets(self, targets: Iterable) -> None:
        """Learn which parameters are sparse: `dst_prune.DynamicSparsity` calls it when handed this optimizer.

        Args:
            targets: the controller's `SparseTarget`s; those whose parameter this optimizer holds get compact
                state from the next step on (existing dense state is compacted then).

        Raises:
            DSTError: a target is sharded (FSDP2); nothing is changed.
        """
        held = {p for group in self.param_groups for p in group["params"]}
        found = []
        for target in targets:
            param = target.param
            if param not in held:
                continue
            if target.sharded or is_dtensor(param):
                raise DSTError(f"{target.name} is sharded (a DTensor, e.g. by FSDP2's fully_shard); "
                               f"{type(self).__name__} was handed to its controller. {_FSDP2_FIX}")
            order = memory_order(param)
            if order is None:  # overlapping or gapped memory: no flat view; it keeps dense state
                logger.warning("%s has no dense memory layout; its optimizer state stays dense", target.name)
                continue
            found.append((param, SparseSlot(target.module, target.tensor_name, target.name, order)))
        for param, slot in found:
            if param not in self._slots or self._slots[param].module() is not slot.module():
                self._slots[param] = slot

    def sparse_parameter_names(self) -> list[str]:
        """The names of the parameters whose state is (or becomes at the next step) compact."""
        return [slot.name for slot in self._slots.values()]

    def state_bytes(self) -> int:
        """Bytes held by the optimizer's state tensors (index maps included)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    def name_of(self, param: torch.Tensor) -> str:
        """The parameter's name for messages: its sparse name, its `param_names` entry, or its place and shape."""
        if param in self._slots:
            return self._slots[param].name
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p is param:
                    names = group.get("param_names")
                    return names[i] if names else f"parameter {i} of param group {g} (shape {tuple(p.shape)})"
        return f"a parameter of shape {tuple(param.shape)}"

    # --- stepping ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (with `free_gradients=True`: finish the step that backward already applied).

        Args:
            closure: re-evaluates the model and returns the loss (optional, as for torch's optimizers).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._freeing is not None:
            self._freeing.finish_step()
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self.step_parameters(group, params, [p.grad for p in params])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """`torch.optim.Optimizer.zero_grad`; also drops the stand-ins of gradients that `free_gradients` freed."""
        if self._freeing is not None:
            self._freeing.forget_gradients()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step_parameters(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
                        grad_indices: list[torch.Tensor | None] | None = None) -> None:
        """Apply the update to `params` of `group` with their gradients.

        Args:
            grad_indices: per parameter, None for a dense gradient, else the active positions a compact gradient
                was gathered at (`free_gradients` holds them so on its first step).
        """
        if not params:
            return
        for param, grad in zip(params, grads):
            if grad.is_sparse:
                raise DSTError(f"{type(self).__name__} does not support sparse gradients ({self.name_of(param)} "
                               f"has one); use dense gradients (e.g. nn.Embedding(sparse=False)).")
        grad_indices = grad_indices or [None] * len(params)
        if self.batches(group, params):
            views = [self._view(group, p, g, i) for p, g, i in zip(params, grads, grad_indices)]
            self.update(group, views)
            for view in views:
                if view.write_back is not None:
                    view.write_back()
            return
        small = []  # dense tensors of at most a piece: one call for all, as torch's single-tensor loop
        for param, grad, indices in zip(params, grads, grad_indices):
            view = self._view(group, param, grad, indices)
            if view.write_back is None and view.weights.numel() <= self.piece_elements:
                small.append(view)
                continue
            self._update_in_pieces(group, view)
            if view.write_back is not None:
                view.write_back()
        if small:
            self.update(group, small)

    def batches(self, group: dict, params: list[torch.Tensor]) -> bool:
        """Whether one call updates all of a group's parameters (foreach/fused), as torch decides it."""
        if group.get("fused"):
            return True
        if group.get("foreach") is not None:
            return bool(group["foreach"])
        return all(p.is_cuda for p in params)  # torch's default: foreach on CUDA, per tensor elsewhere

    # --- what a subclass provides ---------------------------------------------------------------------
    def init_state(self, group: dict, state: dict, like: torch.Tensor) -> None:
        """Fill a parameter's missing state entries (first step), with tensors shaped like `like`."""
        raise NotImplementedError

    def has_state(self, group: dict, state: dict) -> bool:
        """Whether every state tensor the update reads exists already (else it is made from the first gradient)."""
        return True

    def update(self, group: dict, views: list[View]) -> None:
        """Run the algorithm's update on `views` (weights, gradients and state all of the same lengths)."""
        raise NotImplementedError

    # --- checkpoints -------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """`torch.optim.Optimizer.load_state_dict`, keeping the int index maps of compact state as they are.

        Raises:
            DSTError: the state does not fit the parameters (compact state whose lengths disagree with its index
                map, or positions outside the parameter); nothing is changed.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        check_state_dict(state_dict, params, self.per_weight, self.name_of, INDICES)
        stripped, indices = split_indices(state_dict, INDICES)
        super().load_state_dict(stripped)
        restore_indices(self.state, params, indices, INDICES, state_dict)
        for slot in self._slots.values():
            slot.seen = None  # compare the loaded state with the masks at the next step
        if self._freeing is not None:
            self._freeing.forget_gradients()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
