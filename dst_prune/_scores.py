"""What the algorithms rank by, and the non-finite policy (masking rule 11 (docs/design.md)).

Policy: **a non-finite value (NaN, +inf or -inf) is the lowest score.** A NaN or infinite weight is
the first to be dropped (and so is zeroed: the update heals it rather than spreading it); a NaN or
infinite gradient or momentum entry contributes nothing to growth. Every selection stays an exact
top-k over finite numbers, so the count never changes, and each event is logged with the tensor's
name and how many entries were affected.

Why not skip the update instead: a single diverged entry would then freeze the topology for the rest
of training without fixing anything, while ranking it lowest removes exactly the broken entries and
keeps every other decision what it would have been. Non-finite weights at `apply` are refused
outright (`DSTError`), since a pretrained model with NaNs is broken input, not a training event.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["LOWEST_SCORE", "all_finite", "finite_gradient", "finite_scores", "warn_non_finite"]

logger = logging.getLogger(__name__)

#: the score a non-finite entry gets: below every finite score, above the `-inf` that marks excluded positions
LOWEST_SCORE = torch.finfo(torch.float32).min


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of `tensor` is finite: one reduction (`aminmax`, which propagates NaN) instead of
    `torch.isfinite`, which makes several weight-sized passes and temporaries (17x slower on a CPU)."""
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _count_bad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    bad = ~torch.isfinite(tensor)
    return bad, int(torch.count_nonzero(bad))


def finite_scores(scores: torch.Tensor, name: str, what: str = "weights") -> torch.Tensor:
    """`scores` (float) with non-finite entries set to `LOWEST_SCORE`: never grown or kept, dropped first."""
    scores = scores.float()
    if all_finite(scores):
        return scores
    bad, count = _count_bad(scores)
    logger.warning("dst_prune: %s has %d non-finite %s scores (NaN/inf); they rank lowest", name, count, what)
    return scores.masked_fill(bad, LOWEST_SCORE)


def warn_non_finite(tensor: torch.Tensor, name: str, what: str = "weights") -> int:
    """Log (and return) how many entries of `tensor` are not finite; one cheap reduction when there are none."""
    if all_finite(tensor):
        return 0
    count = _count_bad(tensor)[1]
    logger.warning("dst_prune: %s has %d non-finite %s (NaN/inf); they rank lowest", name, count, what)
    return count


def finite_gradient(gradient: torch.Tensor, name: str, what: str = "dense gradient") -> torch.Tensor:
    """`gradient` with non-finite entries set to zero, in place (they contribute nothing to growth)."""
    if all_finite(gradient):
        return gradient
    bad, count = _count_bad(gradient)
    logger.warning("dst_prune: the %s of %s has %d non-finite entries (NaN/inf); they count as zero", what, name,
                   count)
    gradient.masked_fill_(bad, 0.0)
    return gradient
