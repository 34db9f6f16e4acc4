"""Metrics of a training run: a CSV file and, when the `tensorboard` package is there, TensorBoard events."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

__all__ = ["RunLog"]

logger = logging.getLogger(__name__)


class RunLog:
    """Appends rows of scalars to `<dir>/<name>.csv` (columns fixed by the first row) and to TensorBoard."""

    def __init__(self, directory: str | Path, enabled: bool = True) -> None:
        self.directory, self.enabled = Path(directory), enabled
        self.writer = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.directory / "tensorboard"))
            except ImportError:
                logger.info("tensorboard is not installed: writing CSV logs only")

    def log(self, name: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        path = self.directory / f"{name}.csv"
        row = {"step": step, **values}
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{name}/{key}", value, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (by a run that stopped after its last checkpoint) before resuming."""
        if not self.enabled:
            return
        for path in self.directory.glob("*.csv"):
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            if rows:
                with path.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(r for r in rows if int(r["step"]) <= step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
