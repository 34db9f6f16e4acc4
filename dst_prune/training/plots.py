"""Plots of a run that stay readable for many layers: a per-layer density heatmap (layers x updates).

`DynamicSparsity.plot_history` draws one line per layer, which is clear for a few layers; a ResNet-50 or a
ViT has 50 or more, whose repeated colours cannot be told apart. The heatmap gives each layer a row, named
on the axis, and colours the density after every update on one shared scale. Needs matplotlib.
"""

from __future__ import annotations

from pathlib import Path

from ..reports.history import history_rows

__all__ = ["density_heatmap"]


def density_heatmap(dst, path: str | Path, *, title: str | None = None) -> Path:
    """Save a PNG heatmap of every sparse layer's density (active / total) after every update.

    Args:
        dst: the `dst_prune.DynamicSparsity` controller, with at least one update in its `history`.
        path: where to write the PNG.
        title: the figure's title (default: the method and the target sparsity).

    Returns:
        The path written.

    Raises:
        ValueError: the controller has no history yet.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("density_heatmap needs matplotlib: pip install matplotlib") from error
    rows = history_rows(dst.history, dst.targets)
    if not rows:
        raise ValueError("density_heatmap: the controller has no update in its history yet.")
    names = [t.name for t in dst.targets]
    densities = [[row[f"density/{name}"] for row in rows] for name in names]
    height = min(40.0, 1.5 + 0.18 * len(names))
    figure, axes = plt.subplots(figsize=(10, height))
    image = axes.imshow(densities, aspect="auto", interpolation="nearest", cmap="viridis")
    axes.set_yticks(range(len(names)), names, fontsize=max(4, min(9, 360 // max(1, len(names)))))
    steps = [row["step"] for row in rows]
    ticks = sorted(set(range(0, len(steps), max(1, len(steps) // 10))) | {len(steps) - 1})
    axes.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=8)
    axes.set_xlabel("optimizer step of the update")
    axes.set_title(title or f"per-layer density ({dst.method}, target sparsity {dst.target_sparsity:.4f})")
    figure.colorbar(image, ax=axes, label="density (active / total)", fraction=0.03, pad=0.02)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
