"""The seed's two `prettytable` tables: the model's sum table and one row per sparse tensor.

"nonzero" means active (unmasked): a weight regrown at zero counts as non-zero, so the tables show
the exact budget right after a reallocation, as the seed's did.
"""

from __future__ import annotations

from collections.abc import Sequence

from prettytable import PrettyTable
from torch import nn

from .._masking.target import SparseTarget

__all__ = ["STATS_COLUMNS", "SUM_COLUMNS", "count_parameters", "stats_table", "sum_table"]

SUM_COLUMNS = ["# total parameters", "# sparse parameters", "# dense parameters",
               "# nonzero parameters in sparse", "sparsity"]
STATS_COLUMNS = ["Parameter tensor", "# total", "# nonzero", "sparsity"]


def count_parameters(model: nn.Module) -> int:
    """All parameters of the model, each tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def _table(columns: list[str]) -> PrettyTable:
    table = PrettyTable(field_names=columns, float_format=".4", align="r")
    table.align[columns[0]] = "l" if columns is STATS_COLUMNS else "r"
    return table


def sum_table(model: nn.Module, targets: Sequence[SparseTarget]) -> PrettyTable:
    """One row: total, sparse, dense and active-in-sparse parameter counts, and the global sparsity."""
    total = count_parameters(model)
    sparse = sum(t.numel for t in targets)
    active = sum(t.active() for t in targets)
    table = _table(SUM_COLUMNS)
    table.add_row([total, sparse, total - sparse, active, 1.0 - active / sparse])
    return table


def stats_table(targets: Sequence[SparseTarget]) -> PrettyTable:
    """One row per sparse tensor: its qualified name, size, active count and sparsity."""
    table = _table(STATS_COLUMNS)
    for t in targets:
        active = t.active()
        table.add_row([t.name, t.numel, active, 1.0 - active / t.numel])
    return table
