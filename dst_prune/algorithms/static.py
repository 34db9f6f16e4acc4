"""Static sparsity: the mask never changes (the baseline every DST paper reports)."""

from __future__ import annotations

from .base import SparseAlgorithm

__all__ = ["Static"]


class Static(SparseAlgorithm):
    """A fixed sparse mask, chosen once by `apply` (`init`, `distribution`) and trained as is.

    The baseline of SET (Mocanu et al. 2018), RigL (Evci et al. 2020, "Static") and the others: the same
    non-zero budget and layer distribution, without any reallocation.
    """

    name = "static"

    def __init__(self) -> None:
        super().__init__()

    def is_update_step(self, step: int) -> bool:
        return False

    def reparameterize(self) -> None:
        """Nothing to do: a static mask is never reallocated."""
