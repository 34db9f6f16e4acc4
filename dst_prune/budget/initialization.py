"""The masks `apply` starts from: how many weights per layer (the distribution), and which ones (`init`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._selection import INIT_STREAM, derive_seed, global_top_k
from ..errors import DSTError
from ..groups import Grouping
from ..targets import TargetSpec
from .distributions import layer_budgets, total_budget

__all__ = ["INITS", "initial_masks"]

INITS = ("magnitude", "random")


def _like(param: torch.Tensor, grouping: Grouping, groups: torch.Tensor) -> torch.Tensor:
    """The element mask of `groups`, as a bool tensor with `param`'s device and memory format."""
    return torch.empty_like(param, dtype=torch.bool).copy_(grouping.expand(groups.to(param.device)))


def _scores(param: torch.Tensor, grouping: Grouping, init: str, seed: int, layer: int) -> torch.Tensor:
    """What `init` ranks groups by: mean `|w|`, or uniform noise from a CPU generator (same on every device)."""
    if init == "magnitude":
        return grouping.reduce(param)
    generator = torch.Generator().manual_seed(derive_seed(seed, INIT_STREAM, layer))
    return torch.rand(grouping.group_shape, generator=generator)


def _refuse_empty(specs: Sequence[TargetSpec], counts: Sequence[int], sparsity: float, distribution: object) -> None:
    empty = [s.name for s, c in zip(specs, counts) if c == 0]
    if empty:
        advice = "" if distribution == "erk" else "use distribution='erk' (denser small layers), "
        raise DSTError(f"sparsity={sparsity} with distribution={distribution!r} would leave {empty[0]} (and "
                       f"{len(empty) - 1} more) with no active weight. Lower the sparsity, {advice}or exclude "
                       f"{empty[0]!r}.")


def initial_masks(specs: Sequence[TargetSpec], params: Sequence[torch.Tensor], *, sparsity: float,
                  final_sparsity: float, distribution: object, init: str, seed: int,
                  groupings: Sequence[Grouping] | None = None, algorithm: object = None) -> list[torch.Tensor]:
    """Bool masks with exactly `round((1 - sparsity) * N)` active groups in all (`N` groups; weights by default).

    Args:
        specs: the targets, for error messages.
        params: their parameters.
        sparsity: the sparsity to start from.
        final_sparsity: the sparsity to end at (checked too: gradual methods must not empty a layer later).
        distribution: `uniform`, `er`, `erk` (exact per-layer counts, then each layer's top scores) or
            `global` (the top scores of the whole model, at least one per layer).
        init: `magnitude` (the largest `|w|`, ties to the lower index) or `random`.
        seed: the seed of `random`.
        groupings: the groups pruned as wholes (`granularity`); weights by default. With `n:m`, every
            block of `m` keeps its `n` best.
        algorithm: the `SparseAlgorithm`, whose `initial_groups` may reshape the chosen masks into its pattern
            (SRigL's constant fan-in), keeping the total.
    """
    groupings = groupings or [Grouping(p.shape) for p in params]
    shapes, sizes = [p.shape for p in params], [g.n_groups for g in groupings]
    scores = [_scores(p, g, init, seed, i) for i, (p, g) in enumerate(zip(params, groupings))]
    if distribution == "global":
        n = sum(sizes)
        for s in (sparsity, final_sparsity):
            if total_budget(s, n) < len(params):
                raise DSTError(f"sparsity={s} leaves {total_budget(s, n)} active weights for {len(params)} sparse "
                               f"tensors; distribution='global' keeps at least one in each. Lower the sparsity.")
        chosen = global_top_k(scores, total_budget(sparsity, n))
    else:
        _refuse_empty(specs, layer_budgets(shapes, final_sparsity, distribution, sizes), final_sparsity, distribution)
        counts = layer_budgets(shapes, sparsity, distribution, sizes)
        _refuse_empty(specs, counts, sparsity, distribution)
        chosen = [g.initial_groups(s, c) for g, s, c in zip(groupings, scores, counts)]
    if algorithm is not None:
        chosen = algorithm.initial_groups(list(specs), list(groupings), scores, chosen)
    return [_like(p, g, c) for p, g, c in zip(params, groupings, chosen)]
