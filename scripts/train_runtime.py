"""How `scripts/train.py` behaves as a process: stopping on SIGINT/SIGTERM, CPU threads, progress output.

- `StopRequest`: the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) asks the run to stop at
  the next optimizer step; every rank agrees on that step, saves a checkpoint and exits with 128 + the
  signal's number, printing the command that resumes. A second signal stops at once, without saving.
- `choose_threads`: one thread for small models on the CPU, where more only add overhead.
- `ProgressReport`: a tqdm bar on a terminal, a plain log line every 30 s into a file (no carriage returns).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time

import torch
from tqdm import tqdm

__all__ = ["SMALL_MODEL", "ProgressReport", "StopRequest", "choose_threads", "ignore_stop_signals",
           "resume_command"]

logger = logging.getLogger("train")

SMALL_MODEL = 1_000_000  # parameters: below this, one CPU thread is fastest (the work per op is too small to split)
AGREE_EVERY = 10  # optimizer steps between the ranks' agreements on a stop (one tiny all-reduce each)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """`worker_init_fn` of data-loading processes: the main process handles Ctrl-C and SIGTERM for them."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class StopRequest:
    """Turns SIGINT / SIGTERM into a request to stop at the next optimizer step (a context manager).

    Args:
        announce: print a line when a signal arrives (the main process).
    """

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for number in STOP_SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, _frame: object) -> None:
        if self.received is not None:  # the second signal: stop now, without saving
            self.__exit__()
            raise KeyboardInterrupt
        self.received = number
        if self.announce:
            os.write(2, f"\n{signal.Signals(number).name}: stopping after the current optimizer step, once a "
                        f"checkpoint is saved (send it again to stop at once, without saving)\n".encode())

    def agreed(self, accelerator, step: int) -> int | None:
        """The signal that stops every rank after optimizer step `step`, or None: all ranks get the same answer.

        With several processes the ranks compare their requests every `AGREE_EVERY` steps (one all-reduce of
        one number), so that all of them stop, and save, after the same step.
        """
        if accelerator.num_processes == 1:
            return self.received
        if step % AGREE_EVERY:
            return None
        flag = torch.tensor([self.received or 0], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def resume_command(argv: list[str], processes: int, script: str) -> str:
    """The command that resumes this run: as it was started, without `--resume X`/`--overwrite`, `--resume latest`.

    Args:
        argv: the flags of train.py.
        processes: the number of processes (more than one: an `accelerate launch` command).
        script: the path of train.py as the user gave it.
    """
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif token != "--overwrite" and not token.startswith("--resume="):
            kept.append(token)
    if processes > 1:
        prefix = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), script]
    else:
        original = list(getattr(sys, "orig_argv", []))
        prefix = original[: original.index(script) + 1] if script in original else [sys.executable, script]
    return shlex.join([*prefix, *kept, "--resume", "latest"])


def choose_threads(requested: int | None, device: torch.device, parameters: int) -> int | None:
    """The CPU threads per process: `requested`, else 1 for a model under `SMALL_MODEL` parameters on the CPU.

    None leaves torch's choice (a GPU run, a large model, or `OMP_NUM_THREADS` set by the user or the launcher).
    """
    if requested:
        return requested
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    return 1 if parameters < SMALL_MODEL else None


class ProgressReport:
    """Training progress: a tqdm bar on a terminal; into a file, a log line at most every `interval` seconds."""

    def __init__(self, total: int, initial: int, enabled: bool, interval: float = 30.0) -> None:
        self.total, self.step, self.enabled, self.interval = total, initial, enabled, interval
        self.values: dict[str, str] = {}
        self.last = time.monotonic()
        interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr) if interactive else None

    def update(self, **values: float) -> None:
        """One optimizer step done; `values` (loss, sparsity) are shown from then on."""
        self.step += 1
        self.values.update({k: f"{v:.4f}" for k, v in values.items()})
        if self.bar is not None:
            self.bar.update(1)
            if values:
                self.bar.set_postfix(self.values, refresh=False)
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            shown = ", ".join(f"{k} {v}" for k, v in self.values.items())
            logger.info("step %d/%d (%.0f%%)%s", self.step, self.total, 100 * self.step / self.total,
                        f", {shown}" if shown else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
