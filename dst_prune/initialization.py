"""The masks `apply` starts from: how many weights per layer (the distribution), and which ones (`init`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .distributions import layer_budgets, total_budget
from .errors import DSTError
from .selection import INIT_STREAM, derive_seed, global_top_k, top_k_mask
from .targets import TargetSpec

__all__ = ["INITS", "initial_masks"]

INITS = ("magnitude", "random")


def _like(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`mask` as a bool tensor with `param`'s device and memory format."""
    return torch.empty_like(param, dtype=torch.bool).copy_(mask.view(param.shape))


def _scores(param: torch.Tensor, init: str, seed: int, layer: int) -> torch.Tensor:
    """What `init` ranks by: `|w|`, or uniform noise from a CPU generator (the same mask on every device)."""
    if init == "magnitude":
        return param.detach().abs()
    generator = torch.Generator().manual_seed(derive_seed(seed, INIT_STREAM, layer))
    return torch.rand(param.shape, generator=generator)


def _refuse_empty(specs: Sequence[TargetSpec], counts: Sequence[int], sparsity: float, distribution: str) -> None:
    empty = [s.name for s, c in zip(specs, counts) if c == 0]
    if empty:
        raise DSTError(f"sparsity={sparsity} with distribution={distribution!r} would leave {empty[0]} (and "
                       f"{len(empty) - 1} more) with no active weight. Lower the sparsity, use "
                       f"distribution='erk', or exclude {empty[0]!r}.")


def initial_masks(specs: Sequence[TargetSpec], params: Sequence[torch.Tensor], *, sparsity: float,
                  final_sparsity: float, distribution: str, init: str, seed: int) -> list[torch.Tensor]:
    """Bool masks with exactly `round((1 - sparsity) * N)` True entries in all.

    Args:
        specs: the targets, for error messages.
        params: their parameters.
        sparsity: the sparsity to start from.
        final_sparsity: the sparsity to end at (checked too: gradual methods must not empty a layer later).
        distribution: `uniform`, `er`, `erk` (exact per-layer counts, then each layer's top scores) or
            `global` (the top scores of the whole model, at least one per layer).
        init: `magnitude` (the largest `|w|`, ties to the lower index) or `random`.
        seed: the seed of `random`.
    """
    shapes = [p.shape for p in params]
    scores = [_scores(p, init, seed, i) for i, p in enumerate(params)]
    if distribution == "global":
        n = sum(p.numel() for p in params)
        for s in (sparsity, final_sparsity):
            if total_budget(s, n) < len(params):
                raise DSTError(f"sparsity={s} leaves {total_budget(s, n)} active weights for {len(params)} sparse "
                               f"tensors; distribution='global' keeps at least one in each. Lower the sparsity.")
        return [_like(p, m) for p, m in zip(params, global_top_k(scores, total_budget(sparsity, n)))]
    _refuse_empty(specs, layer_budgets(shapes, final_sparsity, distribution), final_sparsity, distribution)
    counts = layer_budgets(shapes, sparsity, distribution)
    _refuse_empty(specs, counts, sparsity, distribution)
    return [_like(p, top_k_mask(s, c)) for p, s, c in zip(params, scores, counts)]
