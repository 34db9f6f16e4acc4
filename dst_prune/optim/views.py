"""How a compact optimizer sees a parameter: its active weights, gradient and state (`CompactViews`).

A sparse parameter's per-weight state is laid out over its active positions (`layout.active_indices`). Whenever
the mask was written since the state was laid out, the state is laid out again before the next update: survivors
keep theirs, pruned entries go, grown ones start at zero. Large tensors are updated in pieces, so that the
temporaries of an update stay small.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar

import torch

from .layout import SparseSlot, active_indices, flat, memory_order, remap

__all__ = ["INDICES", "CompactViews", "View"]

logger = logging.getLogger(__name__)

#: the state entry that lists the positions a compact state covers
INDICES = "active_indices"


class View:
    """What one update sees of a parameter: its (active) weights, gradient and state, and how to write back."""

    __slots__ = ("grad", "state", "weights", "write_back")

    def __init__(self, weights: torch.Tensor, grad: torch.Tensor, state: dict,
                 write_back: Callable[[], None] | None = None) -> None:
        self.weights, self.grad, self.state, self.write_back = weights, grad, state, write_back


class CompactViews:
    """The per-parameter views of `CompactStateOptimizer` (a mixin of it; see the module docstring).

    Uses the optimizer's `state`, its sparse parameters (`_slots`: parameter to `SparseSlot`), `init_state`,
    `has_state`, `update` and `name_of`.
    """

    per_weight: ClassVar[tuple[str, ...]] = ()
    #: weights per piece when a large tensor is updated (`_update_in_pieces`); 2**21 float32 weights: 8 MiB
    piece_elements: ClassVar[int] = 2**21

    def _view(self, group: dict, param: torch.Tensor, grad: torch.Tensor,
              grad_indices: torch.Tensor | None = None) -> View:
        """`param`'s weights, gradient and state for one update: the active ones (gathered) if it is sparse."""
        state = self.state[param]
        slot = self._slots.get(param)
        mask = slot.mask_of(param) if slot is not None else None
        if mask is None:
            if slot is not None:  # no longer sparse (dst_prune.remove): the state becomes dense
                del self._slots[param]
            if INDICES in state:
                self._densify(param, state)
            self.init_state(group, state, param)
            return View(param, grad, state)
        indices = self._lay_out(param, slot, mask, state)
        positions = indices.long()  # (take and put_ are the fastest gather and scatter on CPU; they need int64)
        weights_flat = flat(param, slot.order)
        weights = torch.take(weights_flat, positions)
        if grad_indices is None:
            compact_grad = torch.take(flat(grad, slot.order), positions)
        elif grad_indices is indices or torch.equal(grad_indices, indices):
            compact_grad = grad
        else:  # the mask changed between backward and step: carry the gradient over like the state
            compact_grad = remap(grad, grad_indices, indices)
        self.init_state(group, state, weights)
        return View(weights, compact_grad, state, lambda: weights_flat.put_(positions, weights))

    def _lay_out(self, param: torch.Tensor, slot: SparseSlot, mask: torch.Tensor, state: dict) -> torch.Tensor:
        """The active positions of `param` now; its state is laid out over them first if the mask was written.

        Survivors keep their state, pruned entries go, grown ones start at zero. A controller zeroes a weight
        it prunes or grows, also one it prunes and grows back within one update (GraNet's pruning then
        regrowth, a non-finite weight restarted), which no mask comparison can see: an active weight that is
        exactly zero after a mask write restarts its state at zero too, as the controller zeroes torch's state.
        """
        if slot.unchanged(mask) and INDICES in state:
            return state[INDICES]
        new = active_indices(mask, slot.order)
        old = state.get(INDICES)
        if old is not None and old.shape == new.shape and torch.equal(old, new):
            new = old
        per_weight = [k for k in self.per_weight if isinstance(state.get(k), torch.Tensor)]
        if per_weight:
            restarted = flat(param, slot.order).index_select(0, new) == 0
            for key in per_weight:
                if old is None:  # dense state from before the hand-over (or from torch's optimizer)
                    value = flat(state[key], slot.order).index_select(0, new)
                else:
                    value = state[key] if new is old else remap(state[key], old, new)
                state[key] = value.masked_fill_(restarted, 0)
        if new is not old:
            logger.debug("%s: optimizer state laid out over %d active weights", slot.name, new.numel())
        state[INDICES] = new
        slot.checked(mask)
        return new

    def gather_gradient(self, param: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`grad` at the active positions of `param` and those positions (None, and `grad` itself, if dense).

        Leaves the state as it is (`free_gradients` holds the first backward's gradients this way).
        """
        slot = self._slots.get(param)
        mask = slot.mask_of(param) if slot is not None else None
        if mask is None:
            return grad, None
        state = self.state.get(param, {})
        indices = state[INDICES] if slot.unchanged(mask) and INDICES in state else active_indices(mask, slot.order)
        return flat(grad, slot.order).index_select(0, indices), indices

    def _densify(self, param: torch.Tensor, state: dict) -> None:
        """Turn compact state back into dense tensors of `param`'s shape (zeros at inactive positions)."""
        indices = state.pop(INDICES).long()
        order = memory_order(param)
        restarted = flat(param, order).index_select(0, indices) == 0  # pruned since the last step (`_lay_out`)
        for key in self.per_weight:
            value = state.get(key)
            if isinstance(value, torch.Tensor):
                dense = torch.zeros_like(param, dtype=value.dtype)
                flat(dense, order).index_copy_(0, indices, value.masked_fill(restarted, 0))
                state[key] = dense
        logger.info("%s is no longer sparse; its optimizer state is dense again", self.name_of(param))

    def _update_in_pieces(self, group: dict, view: View) -> None:
        """`update` on `view`, in pieces of `piece_elements` weights: the update is elementwise, so the result is
        the same, and its temporaries (torch's Adam makes two of the tensor's size) stay piece-sized."""
        state, size = view.state, view.weights.numel()
        order = memory_order(view.weights) if size > self.piece_elements else None
        per_weight = [k for k in self.per_weight if isinstance(state.get(k), torch.Tensor)]
        if order is None or not self.has_state(group, state) or any(
                state[k].shape != view.weights.shape or not state[k].permute(order).is_contiguous()
                for k in per_weight):
            self.update(group, [view])
            return
        weights, grad = flat(view.weights, order), flat(view.grad, order)
        tensors = {k: flat(state[k], order) for k in per_weight}
        piece: dict = {}
        for start in range(0, size, self.piece_elements):
            end = start + self.piece_elements
            piece = {k: t[start:end] for k, t in tensors.items()}
            if "step" in state:  # every piece counts the same step once
                piece["step"] = state["step"].clone()
            self.update(group, [View(weights[start:end], grad[start:end], piece)])
        if "step" in state:
            state["step"].copy_(piece["step"])
