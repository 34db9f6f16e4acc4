"""The entry points `apply` and `remove` (`load_sparse_state_dict` is in `loading.py`).

Every argument is validated, the targets chosen and the initial masks computed before the model is
touched; if attaching fails anyway, the model is restored exactly (parameter order included).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .algorithms import SparseAlgorithm, create_algorithm
from .distributions import DISTRIBUTIONS
from .errors import DSTError
from .groups import Grouping, groupings_for
from .initialization import INITS, initial_masks
from .masked_weight import zero_outside
from .masking import attach, is_sparse, make_permanent
from .optimizer_state import require_optimizer
from .readers import attach_readers, direct_readers
from .schedules import UpdateSchedule
from .sharding import refuse_sharded
from .sparsity import DynamicSparsity
from .targets import NameFilter, TargetSpec, find_targets
from .validation import check_choice, check_int, check_number, check_steps

__all__ = ["apply", "remove"]

logger = logging.getLogger(__name__)


def _check_model(model: object) -> nn.Module:
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


def _refuse_non_finite(specs: Sequence[TargetSpec], params: Sequence[torch.Tensor]) -> None:
    """Non-finite weights are broken input, not something to choose masks by (`dst_prune.scores`)."""
    for spec, param in zip(specs, params):
        bad = int(torch.count_nonzero(~torch.isfinite(param.detach())))
        if bad:
            raise DSTError(f"{spec.name} has {bad} non-finite values (NaN or inf) of {param.numel()}; a mask "
                           f"chosen from them would be meaningless. Fix or reload the weights (or exclude "
                           f"{spec.name!r}) before dst_prune.apply.")


def _algorithm_and_schedule(method: object, hyperparameters: dict, *, update_every: int, total_steps: int | None,
                            stop_step: int | None, stop_fraction: float | None,
                            double_at: Sequence[int]) -> tuple[SparseAlgorithm, UpdateSchedule]:
    """Build the algorithm and resolve its stop step: `stop_step`, else `stop_fraction * total_steps`."""
    algorithm = create_algorithm(method, hyperparameters)
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps < 1):
        raise DSTError(f"total_steps must be None or a positive integer; received {total_steps!r}.")
    if stop_fraction is not None:
        check_number(stop_fraction, "stop_fraction", low=0.0, high=1.0, low_open=True, high_open=False)
    double_at = check_steps(double_at, "double_at")
    fraction = stop_fraction if stop_fraction is not None else algorithm.default_stop_fraction
    if stop_step is None and fraction is not None and total_steps is not None:
        stop_step = max(1, round(fraction * total_steps))
    if algorithm.needs_total_steps and stop_step is None and total_steps is None:
        raise DSTError(f"method={algorithm.name!r} needs the length of training for its schedule: pass "
                       f"total_steps=<number of optimizer steps> (or stop_step=...).")
    schedule = UpdateSchedule(update_every=update_every, stop_step=stop_step, double_at=double_at)
    algorithm.check_schedule(schedule)
    return algorithm, schedule


def _attach_all(model: nn.Module, specs: list[TargetSpec], masks: list[torch.Tensor], groupings: list[Grouping],
                **controller_arguments: object) -> DynamicSparsity:
    """Attach every mask, or none: on failure the touched modules are restored exactly."""
    readers = direct_readers(model, specs)  # (before anything is attached: nothing to undo if it fails)
    touched = {id(m): m for m in (model.get_submodule(s.module_name) for s in specs)}
    touched.update({id(m): m for m in (model.get_submodule(n) for n in readers)})
    saved = {key: (dict(m._parameters), dict(m._buffers), dict(m._forward_pre_hooks), dict(m._forward_hooks),
                   set(m.__dict__)) for key, m in touched.items()}
    try:
        targets = [attach(model, spec, mask, grouping) for spec, mask, grouping in zip(specs, masks, groupings)]
        attach_readers(model, readers)
        for target in targets:  # only now, when nothing can fail any more, zero the masked weights
            with torch.no_grad():
                zero_outside(target.orig, target.mask)
            target.refresh()
    except BaseException:
        for key, module in touched.items():
            params, buffers, pre_hooks, hooks, attributes = saved[key]
            for current, old in ((module._parameters, params), (module._buffers, buffers),
                                 (module._forward_pre_hooks, pre_hooks), (module._forward_hooks, hooks)):
                current.clear()
                current.update(old)
            for attribute in set(module.__dict__) - attributes:
                del module.__dict__[attribute]
            if isinstance(module, nn.RNNBase):
                module._init_flat_weights()
        raise
    controller = DynamicSparsity(model, targets, budget=sum(t.active_groups() for t in targets), **controller_arguments)
    logger.info("dst_prune: %s on %d tensors, %d of %d weights active (sparsity %.4f)", controller.method,
                len(targets), controller.budget, controller.n_sparse, controller.sparsity)
    return controller


def apply(model: nn.Module, *, sparsity: float, method: str = "dsr", distribution: str = "uniform",
          include: NameFilter = None, exclude: NameFilter = None, dense_stem_and_head: bool = True,
          init: str = "magnitude", granularity: str = "element", optimizer: object = None, update_every: int = 100,
          total_steps: int | None = None, stop_fraction: float | None = None, stop_step: int | None = None,
          double_at: Sequence[int] = (), seed: int = 0, **hyperparameters: object) -> DynamicSparsity:
    """Make `model` sparse in place and return the controller that keeps it so while it trains.

    Args:
        model: any `nn.Module` (timm, torchvision, your own). Modified in place, like
            `torch.nn.utils.prune`: each sparse `weight` becomes `weight_orig` + bool `weight_mask`.
        sparsity: the fraction of zeros among the sparse parameters, in [0, 1). Exactly
            `round((1 - sparsity) * N)` weights stay active, for every distribution and every update
            (gradual methods start denser and reach it at their stop step).
        method: the algorithm: one of `dst_prune.list_methods()`, or a `dst_prune.SparseAlgorithm` (a subclass, or
            a fresh instance, e.g. of a method of your own; see `dst_prune.register_method`).
        distribution: how the budget is split across layers: `uniform`, `er`, `erk` or `global` (the
            largest weights of the whole model, at least one per layer).
        include: `None` for the default layers; else exactly the parameters it matches (a regex for
            `re.fullmatch`, or a list of names or `.`-suffixes of names).
        exclude: parameters to keep dense, in the same forms.
        dense_stem_and_head: keep the stem conv and the classifier dense (default selection only).
        init: `magnitude` keeps the largest weights (a pretrained model keeps its function); `random`
            draws the initial mask at random, as the papers do from scratch.
        granularity: what is pruned, grown and counted as a whole: `element` (default), `kernel` (a
            conv's k x k kernels), `channel` (output channels) or `n:m` (e.g. `2:4`: `n` of every `m`
            consecutive weights along the input dimension; then `sparsity` must be `1 - n/m`). The
            budget counts groups: exactly `round((1 - sparsity) * N_groups)` are active.
        optimizer: its state is zeroed at pruned and regrown positions (also settable later as
            `controller.optimizer`); an accelerate-wrapped optimizer works.
        update_every: reallocate every this many optimizer steps (`controller.step()` calls).
        total_steps: the length of training in optimizer steps; RigL, SNFS, GMP and GraNet need it.
        stop_fraction: stop reallocating (and end decays and gradual pruning) at this fraction of
            `total_steps`; default per method (RigL, GMP, GraNet 0.75; SNFS 1.0; others never stop).
        stop_step: the same as an absolute step; overrides `stop_fraction`.
        double_at: steps from which the reallocation period doubles (the DSR paper's recipes).
        seed: seeds every random draw (initial mask, growth), so all ranks and resumed runs agree.
        **hyperparameters: the method's own, e.g. DSR's `target_fraction_to_prune`, `pruning_threshold`,
            `delta`; RigL's `drop_fraction`, `decay`; GMP's `initial_sparsity`, `begin_step`.

    Returns:
        The `DynamicSparsity` controller.

    Raises:
        DSTError: any bad argument; the model is left untouched.
    """
    model = _check_model(model)
    sparsity = check_number(sparsity, "sparsity", low=0.0, high=1.0)
    distribution = check_choice(distribution, "distribution", DISTRIBUTIONS)
    init = check_choice(init, "init", INITS)
    seed = check_int(seed, "seed")
    algorithm, schedule = _algorithm_and_schedule(method, hyperparameters, update_every=update_every,
                                                  total_steps=total_steps, stop_step=stop_step,
                                                  stop_fraction=stop_fraction, double_at=double_at)
    start_sparsity = algorithm.initial_sparsity(sparsity)
    specs = find_targets(model, include=include, exclude=exclude, dense_stem_and_head=dense_stem_and_head)
    params = [model.get_submodule(s.module_name)._parameters[s.tensor_name] for s in specs]
    refuse_sharded(model, [s.name for s in specs], params)
    _refuse_non_finite(specs, params)
    groupings = groupings_for(granularity, [s.name for s in specs], [p.shape for p in params], sparsity=sparsity,
                              distribution=distribution, gradual=algorithm.gradual, layouts=[s.layout for s in specs])
    masks = initial_masks(specs, params, sparsity=start_sparsity, final_sparsity=sparsity,
                          distribution=distribution, init=init, seed=seed, groupings=groupings,
                          algorithm=algorithm)
    require_optimizer(optimizer)
    config = {"distribution": distribution, "init": init, "granularity": granularity,
              "hyperparameters": dict(hyperparameters), "stop_fraction": stop_fraction, "stop_step": stop_step}
    return _attach_all(model, specs, masks, groupings, algorithm=algorithm, schedule=schedule, seed=seed,
                       target_sparsity=sparsity, distribution=distribution, total_steps=total_steps,
                       optimizer=optimizer, config=config)


def remove(model: nn.Module) -> nn.Module:
    """Make the sparsity permanent: every sparse `weight` becomes a plain Parameter with zeros in place.

    The Parameter objects are kept (optimizer state stays valid); all dst_prune hooks are removed. The
    result's `state_dict` loads into an untouched model of the same architecture.

    Returns:
        `model`, for chaining.
    """
    if not isinstance(model, nn.Module):
        raise DSTError(f"model must be a torch.nn.Module; received {type(model).__name__}.")
    if not make_permanent(model):
        logger.warning("dst_prune.remove: the model has no dst_prune masks; nothing to remove")
    return model
