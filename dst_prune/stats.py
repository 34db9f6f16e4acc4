"""Sparsity reports: the seed's two `prettytable` tables, and the history of reallocations as CSV and plot.

"nonzero" means active (unmasked): a weight regrown at zero counts as non-zero, so the tables show
the exact budget right after a reallocation, as the seed's did.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from prettytable import PrettyTable
from torch import nn

from .sparse_target import SparseTarget

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


def history_rows(history: Sequence[dict], targets: Sequence[SparseTarget]) -> list[dict]:
    """One flat row per reallocation: step, sparsity, churn, itop, the algorithm's metrics, per-layer density."""
    n_groups = sum(t.n_groups for t in targets)  # the history counts groups (weights, for `element`)
    rows = []
    for record in history:
        row = {"step": record["step"], "update": record["update"],
               "sparsity": 1.0 - sum(record["active"]) / n_groups,
               "pruned": sum(record["pruned"]), "grown": sum(record["grown"])}
        row.update({k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in row})
        row.update({f"density/{t.name}": a / t.n_groups for t, a in zip(targets, record["active"])})
        rows.append(row)
    return rows


def save_history_csv(history: Sequence[dict], targets: Sequence[SparseTarget], path: str | Path) -> Path:
    """Write `history_rows` as CSV; returns the path."""
    rows = history_rows(history, targets)
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["step"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_history(history: Sequence[dict], targets: Sequence[SparseTarget], path: str | Path) -> Path:
    """Save a PNG: per-layer density over training, and the in-time over-parameterization rate and churn.

    Needs matplotlib (`pip install matplotlib`); dst_prune itself does not depend on it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plot_history needs matplotlib: pip install matplotlib") from error
    rows = history_rows(history, targets)
    steps = [r["step"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for t in targets:
        left.plot(steps, [r[f"density/{t.name}"] for r in rows], linewidth=1, label=t.name)
    left.set(xlabel="optimizer step", ylabel="density (active / total)", title="per-layer density", yscale="log")
    if len(targets) <= 12:
        left.legend(fontsize=7)
    right.plot(steps, [r["itop"] for r in rows], label="in-time over-parameterization (ever active)")
    right.plot(steps, [r["churn"] for r in rows], label="churn (new / active, per update)")
    right.set(xlabel="optimizer step", title="exploration", ylim=(0, 1.05))
    right.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class SparsityReports:
    """The reports of `DynamicSparsity` (which provides `model`, `targets` and `history`)."""

    model: nn.Module
    targets: list[SparseTarget]
    history: list[dict]

    @property
    def sum_table(self) -> PrettyTable:
        """`# total parameters | # sparse parameters | # dense parameters | # nonzero parameters in sparse |
        sparsity`."""
        return sum_table(self.model, self.targets)

    @property
    def stats_table(self) -> PrettyTable:
        """`Parameter tensor | # total | # nonzero | sparsity`, one row per sparse tensor."""
        return stats_table(self.targets)

    def save_history(self, path: str | Path) -> str:
        """Write the reallocation history as CSV (step, sparsity, churn, itop, per-layer density, ...)."""
        return str(save_history_csv(self.history, self.targets, path))

    def plot_history(self, path: str | Path) -> str:
        """Save a PNG of per-layer density, in-time over-parameterization and churn over training."""
        return str(plot_history(self.history, self.targets, path))
