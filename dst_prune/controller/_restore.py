"""Setting a checked controller state: the second half of `DynamicSparsity.load_state_dict`.

`_state.check_state` has accepted everything; what is left can fail only in a method's own `load_state_dict`,
which runs first and is rolled back if it raises, so a failed load still changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .._masking.masked_weight import zero_outside
from .._masking.target import SparseTarget
from .._optimizer_state import optimizer_state_like, unwrap_optimizer
from ..algorithms.base import SparseAlgorithm
from ..algorithms.context import SparsityContext
from ..errors import DSTError
from ._state import CheckedState

__all__ = ["restore"]

logger = logging.getLogger(__name__)


def check_loaded_weights(targets: Sequence[SparseTarget], masks: Sequence[torch.Tensor] | None) -> None:
    """Weights loaded before their masks (marked `unmatched`) must fit the masks now loaded: else they are of
    another step or run, and loading would zero trained weights."""
    for target, mask in zip(targets, masks or []):
        if target.hook.unmatched and not target.sharded:
            weight = target.orig.detach()
            if bool(weight.masked_select(~mask.to(weight.device)).any()):
                raise DSTError(f"{target.name}: the weights loaded into the model are non-zero outside the mask of "
                               f"this controller state: the model state and the controller state are of different "
                               f"steps or runs. Load the controller state saved with those weights.")


def reset_outside_masks(targets: Sequence[SparseTarget], optimizer: object) -> None:
    """Zero weights, gradients and optimizer state outside the masks (after masks were replaced)."""
    inner = unwrap_optimizer(optimizer)
    with torch.no_grad():
        for target in targets:
            param = target.param
            for tensor in (param, param.grad, *optimizer_state_like(inner, param)):
                if tensor is not None:
                    zero_outside(target.local(tensor), target.buffer_mask)
            target.refresh()


def _describe(name: str, context: SparsityContext, algorithm: SparseAlgorithm) -> object:
    if name == "schedule":
        return context.schedule.state_dict()
    if name == "total_steps":
        return context.config.total_steps
    return algorithm.hyperparameter_values()


def restore(checked: CheckedState, *, targets: Sequence[SparseTarget], context: SparsityContext,
            algorithm: SparseAlgorithm, ever_active: Sequence[torch.Tensor], history: list[dict]) -> None:
    """Set `checked` on the controller's parts: the method's state, counters, masks, ever-active bits, history.

    Raises:
        DSTError: weights loaded into the model before their masks do not fit these masks.
        Exception: whatever the method's own `load_state_dict` raises (its attributes are rolled back).
    """
    check_loaded_weights(targets, checked.masks)
    snapshot = algorithm.snapshot()
    try:
        algorithm.load_state_dict(checked.algorithm)
    except BaseException:
        algorithm.restore(snapshot)
        raise
    for name in checked.changed:
        logger.warning("dst_prune: the controller state was saved with another %s; this controller keeps its own "
                       "(%s), from step %d on", name, _describe(name, context, algorithm), checked.step)
    context.step, context.update_index, context.budget = checked.step, checked.update_index, checked.budget
    if checked.masks is not None:
        with torch.no_grad():
            for target, mask in zip(targets, checked.masks):
                target.write_full_mask(mask)
                target.hook.unmatched = False  # (checked above: the loaded weights fit these masks)
        reset_outside_masks(targets, context.optimizer)
    for mine, saved in zip(ever_active, checked.ever_active):
        mine.copy_(saved)
    history[:] = checked.history
