"""Static sparsity: the mask never changes (the baseline every DST paper reports)."""

from __future__ import annotations

import dataclasses

from .base import SparseAlgorithm
from .registry import register_method

__all__ = ["Static"]


@register_method("static")
@dataclasses.dataclass(eq=False, kw_only=True)
class Static(SparseAlgorithm):
    """A fixed sparse mask, chosen once by `apply` (`init`, `distribution`) and trained as is.

    The baseline of SET (Mocanu et al. 2018), RigL (Evci et al. 2020, "Static") and the others: the same
    non-zero budget and layer distribution, without any reallocation.
    """

    def is_update_step(self, step: int) -> bool:
        return False

    def reparameterize(self) -> None:
        """Nothing to do: a static mask is never reallocated."""
