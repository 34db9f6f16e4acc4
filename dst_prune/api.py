"""The entry points `apply` and `remove` (`load_sparse_state_dict` is in `loading.py`).

Every argument is validated (`dst_prune.config.SparsityConfig`), the targets chosen and the initial masks
computed before the model is touched; if attaching fails anyway, the model is restored exactly
(`dst_prune._attach`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from ._attach import attach_all, build_algorithm, check_model
from ._masking.hook import make_permanent
from ._optimizer_state import require_optimizer
from .budget.initialization import initial_masks
from .config import SparsityConfig
from .controller import DynamicSparsity
from .distributed.fsdp import refuse_sharded
from .errors import DSTError
from .groups import groupings_for
from .targets import NameFilter, TargetSpec, find_targets

__all__ = ["apply", "remove"]

logger = logging.getLogger(__name__)


def _refuse_non_finite(specs: Sequence[TargetSpec], params: Sequence[torch.Tensor]) -> None:
    """Non-finite weights are broken input, not something to choose masks by (docs/reliability.md)."""
    for spec, param in zip(specs, params):
        bad = int(torch.count_nonzero(~torch.isfinite(param.detach())))
        if bad:
            raise DSTError(f"{spec.name} has {bad} non-finite values (NaN or inf) of {param.numel()}; a mask "
                           f"chosen from them would be meaningless. Fix or reload the weights (or exclude "
                           f"{spec.name!r}) before dst_prune.apply.")


def apply(model: nn.Module, *, sparsity: float, method: str = "dsr", distribution: str | Callable = "uniform",
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
        method: the algorithm: one of `dst_prune.list_methods()` (`static`, `set`, `dsr`, `rigl`, `srigl`, `snfs`,
            `gmp`, `granet`), or a `dst_prune.SparseAlgorithm` (a subclass, or a fresh instance, e.g. of a method
            of your own; see `dst_prune.register_method`).
        distribution: how the budget is split across layers: `uniform`, `er`, `erk`, `global` (the
            largest weights of the whole model, at least one per layer), or a callable `weight(shape)` to
            which each layer's density is proportional.
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
        total_steps: the length of training in optimizer steps; RigL, SRigL, SNFS, GMP and GraNet need it
            (and any method whose drop fraction decays).
        stop_fraction: stop reallocating (and end decays and gradual pruning) at this fraction of
            `total_steps`; default per method (RigL, SRigL, GMP, GraNet 0.75; SNFS 1.0; others never stop;
            the table in docs/algorithms/index.md is read from the registry).
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
    model = check_model(model)
    config = SparsityConfig(sparsity=sparsity, distribution=distribution, include=include, exclude=exclude,
                            dense_stem_and_head=dense_stem_and_head, init=init, granularity=granularity,
                            update_every=update_every, total_steps=total_steps, stop_fraction=stop_fraction,
                            stop_step=stop_step, double_at=double_at, seed=seed, hyperparameters=hyperparameters)
    algorithm = build_algorithm(method, hyperparameters, config)
    config = replace(config, method=algorithm.name)
    specs = find_targets(model, include=include, exclude=exclude, dense_stem_and_head=dense_stem_and_head)
    params = [model.get_submodule(s.module_name)._parameters[s.tensor_name] for s in specs]
    refuse_sharded(model, [s.name for s in specs], params)
    _refuse_non_finite(specs, params)
    groupings = groupings_for(granularity, [s.name for s in specs], [p.shape for p in params], sparsity=config.sparsity,
                              distribution=distribution, gradual=algorithm.gradual, layouts=[s.layout for s in specs])
    masks = initial_masks(specs, params, sparsity=algorithm.starting_sparsity(config.sparsity),
                          final_sparsity=config.sparsity, distribution=distribution, init=init, seed=config.seed,
                          groupings=groupings, algorithm=algorithm)
    require_optimizer(optimizer)
    return attach_all(model, specs, masks, groupings, algorithm, config, optimizer)


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
