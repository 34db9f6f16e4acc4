"""Metrics of a training run: CSV files with one stable header each and, when installed, TensorBoard events.

A row may carry columns earlier rows did not (DSR's threshold appears at the first update): the file
is then rewritten once with the wider header (atomically), so every row of a file has exactly the
header's fields. Resuming into the same folder drops the rows a stopped run logged after its last
checkpoint (`truncate_after`), so the resumed run logs each step exactly once; TensorBoard gets the same
cut through `purge_step`. Every row ends with a newline, so a last line without one was cut off (a full
disk, a killed process): it is dropped on resume, and the next row starts on a line of its own.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

__all__ = ["RunLog"]

logger = logging.getLogger(__name__)


def _drop_partial_line(path: Path) -> None:
    """Remove a last line that has no newline (a row cut off mid-write), atomically."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    kept = data[: data.rfind(b"\n") + 1]
    logger.warning("%s: dropped a partial last line (cut off mid-write): %r", path, data[len(kept):][:200])
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(kept)
    os.replace(temporary, path)


def _read(path: Path) -> tuple[list[str], list[dict]]:
    """The header and rows of a CSV file (fields beyond the header are dropped)."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
        return list(reader.fieldnames or []), rows


def _write(path: Path, header: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(buffer.getvalue())
    os.replace(temporary, path)


class RunLog:
    """Appends rows of scalars to `<dir>/<name>.csv` and to TensorBoard (`<dir>/tensorboard`)."""

    def __init__(self, directory: str | Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.directory, self.enabled = Path(directory), enabled
        self.headers: dict[str, list[str]] = {}
        self.writer = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.truncate_after(resume_step if resume_step is not None else 0, all_rows=resume_step is None)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.directory / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)
        except ImportError:
            logger.info("tensorboard is not installed: writing CSV logs only")

    def log(self, name: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        path = self.directory / f"{name}.csv"
        row = {"step": step, **values}
        header = self.headers.get(name)
        if header is None:
            header = self.headers[name] = _read(path)[0]
        if not header or any(k not in header for k in row):
            _, rows = _read(path)
            header = self.headers[name] = [*header, *(k for k in row if k not in header)]
            _write(path, header, [*rows, row])
        else:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=header, restval="", lineterminator="\n").writerow(row)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{name}/{key}", value, step)

    def truncate_after(self, step: int, all_rows: bool = False) -> None:
        """Drop the rows logged after `step` (all rows with `all_rows`: a fresh run in a used folder)."""
        if not self.enabled:
            return
        for path in self.directory.glob("*.csv"):
            _drop_partial_line(path)
            header, rows = _read(path)
            kept = [] if all_rows else [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]
            if kept != rows or not header:
                _write(path, header or ["step"], kept)
            self.headers.pop(path.stem, None)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
