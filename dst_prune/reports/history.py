"""The history of reallocations: one flat row per update, as CSV and as a plot."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from .._masking.target import SparseTarget

__all__ = ["history_rows", "plot_history", "save_history_csv"]


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
