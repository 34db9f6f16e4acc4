"""The DST algorithms, one per file, selected with `dst_prune.apply(..., method=name)`.

Each built-in registers itself with `register_method` when its module is imported, in the order below (the
order `list_methods` gives).
"""
# isort: skip_file

from __future__ import annotations

from .base import SparseAlgorithm
from .drop_and_grow import DropAndGrow
from .registry import create_algorithm, list_methods, register_method
from .static import Static
from .set import SET
from .dsr import DSR
from .rigl import RigL
from .srigl import SRigL
from .snfs import SNFS
from .gmp import GMP
from .granet import GraNet

__all__ = ["DSR", "GMP", "SET", "SNFS", "DropAndGrow", "GraNet", "RigL", "SRigL", "SparseAlgorithm", "Static",
           "create_algorithm", "list_methods", "register_method"]
