"""What `apply` and `load_sparse_state_dict` share: the model check, the method, and attaching every mask at once.

Everything is validated, the targets chosen and the masks computed before the model is touched;
`attach_all` then attaches every mask and builds the controller, or, if anything fails (a method's own
`bind` included), restores every touched module exactly: parameters, buffers, hooks, attributes and values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._masking.attach import attach
from ._masking.hook import is_sparse
from ._masking.masked_weight import zero_outside
from ._masking.readers import attach_readers, direct_readers
from ._torch import refresh_rnn_flat_weights, register_load_state_dict_pre_hook
from .algorithms import SparseAlgorithm, create_algorithm
from .config import SparsityConfig
from .controller import DynamicSparsity
from .controller._state import MaskCountCheck
from .distributed.fsdp import refuse_sharded
from .errors import DSTError
from .groups import Grouping
from .targets import TargetSpec

__all__ = ["attach_all", "build_algorithm", "check_model"]

logger = logging.getLogger(__name__)


def check_model(model: object) -> nn.Module:
    """`model` if it is an `nn.Module` dst_prune can make sparse; else the `DSTError` that says why."""
    if not isinstance(model, nn.Module):
        raise DSTError(f"model must be a torch.nn.Module; received {type(model).__name__}.")
    if isinstance(model, torch.jit.ScriptModule):
        raise DSTError("model is a TorchScript module; apply dst_prune to the eager model. To script a trained "
                       "sparse model, script its export: torch.jit.script(dst_prune.export(model)).")
    refuse_sharded(model, [], [])  # FSDP1 wrappers: before the targets are searched (their weights are flat)
    if is_sparse(model):
        raise DSTError("model is already sparse (dst_prune masks are attached). Keep using its controller, "
                       "call dst_prune.remove(model) first, or load a checkpoint with load_sparse_state_dict.")
    return model


def build_algorithm(method: object, hyperparameters: Mapping[str, object], config: SparsityConfig
                    ) -> SparseAlgorithm:
    """The method, checked against the configuration's schedule (it may need `total_steps`)."""
    algorithm = create_algorithm(method, dict(hyperparameters))
    if algorithm.needs_total_steps and config.stop_step is None and config.total_steps is None:
        raise DSTError(f"method={algorithm.name!r} needs the length of training for its schedule: pass "
                       f"total_steps=<number of optimizer steps> (or stop_step=...).")
    algorithm.check_schedule(config.schedule(algorithm.default_stop_fraction))
    return algorithm


def _restore(touched: dict[int, nn.Module], saved: dict) -> None:
    for key, module in touched.items():
        params, buffers, pre_hooks, hooks, state_hooks, load_hooks, attributes = saved[key]
        for current, old in ((module._parameters, params), (module._buffers, buffers),
                             (module._forward_pre_hooks, pre_hooks), (module._forward_hooks, hooks),
                             (module._state_dict_hooks, state_hooks), (module._load_state_dict_pre_hooks, load_hooks)):
            current.clear()
            current.update(old)
        for attribute in set(module.__dict__) - attributes:
            del module.__dict__[attribute]
        refresh_rnn_flat_weights(module)


def attach_all(model: nn.Module, specs: Sequence[TargetSpec], masks: Sequence[torch.Tensor],
               groupings: Sequence[Grouping], algorithm: SparseAlgorithm, config: SparsityConfig,
               optimizer: object = None) -> DynamicSparsity:
    """Attach every mask and build the controller, or change nothing: on failure the modules are restored exactly."""
    readers = direct_readers(model, list(specs))  # (before anything is attached: nothing to undo if it fails)
    touched = {id(m): m for m in (model.get_submodule(s.module_name) for s in specs)}
    touched.update({id(m): m for m in (model.get_submodule(n) for n in readers)})
    touched[id(model)] = model
    saved = {key: (dict(m._parameters), dict(m._buffers), dict(m._forward_pre_hooks), dict(m._forward_hooks),
                   dict(m._state_dict_hooks), dict(m._load_state_dict_pre_hooks), set(m.__dict__))
             for key, m in touched.items()}
    try:
        targets = [attach(model, spec, mask, grouping) for spec, mask, grouping in zip(specs, masks, groupings)]
        attach_readers(model, readers)
        controller = DynamicSparsity(model, targets, algorithm, config,
                                     budget=sum(t.active_groups() for t in targets), optimizer=optimizer)
        register_load_state_dict_pre_hook(model, MaskCountCheck(controller))
    except BaseException:
        _restore(touched, saved)
        raise
    for target in targets:  # only now, when nothing can fail any more, zero the masked weights
        with torch.no_grad():
            zero_outside(target.orig, target.mask)
        target.refresh()
    logger.info("dst_prune: %s on %d tensors, %d of %d weights active (sparsity %.4f)", controller.method,
                len(targets), controller.budget, controller.n_sparse, controller.sparsity)
    return controller
