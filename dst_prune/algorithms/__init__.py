"""The DST algorithms, one per file, selected with `dst_prune.apply(..., method=name)`."""

from __future__ import annotations

from ..errors import DSTError
from .base import SparseAlgorithm
from .dsr import DSR
from .gmp import GMP
from .granet import GraNet
from .rigl import RigL
from .set import SET
from .snfs import SNFS
from .static import Static

__all__ = ["METHODS", "SparseAlgorithm", "create_algorithm", "list_methods"]

METHODS: dict[str, type[SparseAlgorithm]] = {cls.name: cls for cls in (Static, SET, DSR, RigL, SNFS, GMP, GraNet)}


def list_methods() -> list[str]:
    """The names accepted by `method=`."""
    return list(METHODS)


def create_algorithm(method: object, hyperparameters: dict) -> SparseAlgorithm:
    """Build the algorithm named `method` with its hyperparameters, validating both."""
    if not isinstance(method, str) or method not in METHODS:
        raise DSTError(f"method={method!r} is unknown; valid choices: {', '.join(list_methods())}.")
    return METHODS[method].create(**hyperparameters)
