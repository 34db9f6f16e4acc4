"""Atomic checkpoints for accelerate runs, and the training position they resume from.

`save_checkpoint` has every rank write `accelerator.save_state` into a temporary folder, then the main
process renames it into place and points `latest` at it (a rename and a file replace, both atomic): a
crash during a save leaves the last good checkpoint and `latest` untouched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

__all__ = ["TrainingProgress", "atomic_torch_save", "find_checkpoint", "save_checkpoint"]

LATEST = "latest"


class TrainingProgress:
    """Where training is: epoch, batch within the epoch, optimizer steps, micro-batches; checkpointable."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0  # batches of `epoch` already consumed
        self.optimizer_steps = 0
        self.micro_batches = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """`torch.save` to a temporary file in the same folder, then rename it over `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    torch.save(obj, temporary)
    os.replace(temporary, path)
    return path


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def save_checkpoint(accelerator, directory: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Save the accelerator's state as `directory/step-XXXXXXX` atomically; keep the newest `keep`."""
    directory = Path(directory)
    final = directory / f"step-{step:07d}"
    temporary = directory / f".partial-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        _write_text_atomically(directory / LATEST, final.name)
        for old in sorted(directory.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(resume: str, directory: str | os.PathLike) -> Path | None:
    """The checkpoint folder `--resume` names: a path, or `latest` in `directory` (None if there is none)."""
    if resume != LATEST:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        return path
    pointer = Path(directory) / LATEST
    return Path(directory) / pointer.read_text().strip() if pointer.is_file() else None
