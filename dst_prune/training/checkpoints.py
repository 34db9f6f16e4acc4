"""Checkpoints of a training run that load safely, atomically and exactly.

A checkpoint is a folder `step-XXXXXXX` of plain files:

| file | what | read with |
| --- | --- | --- |
| `model.safetensors` | the model's plain state dict (zeros in place; loads into an untouched model) | safetensors |
| `optimizer.pt` | `optimizer.state_dict()` | `torch.load(weights_only=True)` |
| `dst.pt` | the controller's `state_dict()` (masks, budget, ...) | `torch.load(weights_only=True)` |
| `ema.safetensors` | the EMA model's plain state dict, when there is an EMA | safetensors |
| `scheduler.json`, `progress.json` | the LR schedule's state, the training position | JSON |
| `rng-rank<i>.pt` | each rank's random generator states (tensors, integers) | `torch.load(weights_only=True)` |
| `args.json` | the run's command-line flags, to compare on resume (when given) | JSON |
| `manifest.json` | the step, the world size and the SHA-256 of every other file; written last | JSON |

Nothing is unpickled as objects: a file that holds anything but tensors and plain values is refused
(accelerate's `save_state`/`load_state`, which unpickle registered objects with `weights_only=False`,
are not used for that reason). `load_checkpoint` checks the manifest (every file present, every hash
equal: a truncated, flipped or mixed-in file is named), reads and checks everything against the live
objects (`checkpoint_files`: dtypes, finite weights, optimizer state shapes and step counts, the LR
schedule's keys and types, the generator states, no duplicate keys, no name or link that leaves the
folder), and only then loads; a refusal changes nothing.

Saving writes a hidden `.partial-*` folder, syncs it to disk, renames it into place (a new name, never
over an existing folder) and then replaces the `latest` pointer file atomically, so at every moment
`latest` names a complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from ..errors import DSTError
from . import _checkpoint_files as files_check
from ._checkpoint_files import member, read_json

__all__ = ["LATEST", "TrainingProgress", "checkpoint_args", "find_checkpoint", "load_checkpoint", "save_checkpoint",
           "write_atomically"]

logger = logging.getLogger(__name__)

LATEST = "latest"
FORMAT = "dst_prune.checkpoint/1"


class TrainingProgress:
    """Where training is: epoch, batch within the epoch, optimizer steps, micro-batches."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0  # batches of `epoch` already consumed
        self.optimizer_steps = 0
        self.micro_batches = 0
        self.unlogged_losses: list[float] = []  # micro-batch losses since the last logged row

    def state_dict(self) -> dict:
        return {**vars(self), "unlogged_losses": list(self.unlogged_losses)}

    def check(self, state: object, where: str = "progress.json") -> None:
        """Refuse a state that is not a training position (`where` names it in the error)."""
        counters = {k: v for k, v in state.items() if k != "unlogged_losses"} if isinstance(state, dict) else {}
        if not isinstance(state, dict) or set(state) != set(vars(self)) or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counters.values()) or \
                not isinstance(state["unlogged_losses"], list) or \
                not all(isinstance(v, float) for v in state["unlogged_losses"]):
            raise DSTError(f"{where} holds {state!r}; expected non-negative integers for {sorted(counters)} "
                           f"and a list of losses.")

    def load_state_dict(self, state: dict) -> None:
        self.check(state)
        vars(self).update(state)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `path` through a temporary file in the same folder, synced, then renamed over it."""
    temporary = path.with_name(f".{path.name}.partial")
    (temporary.write_text if isinstance(data, str) else temporary.write_bytes)(data)
    _fsync(temporary)
    os.replace(temporary, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_gauss": random.getstate()[2], "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
             "numpy": [int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | os.PathLike, step: int, *, accelerator, model, optimizer, dst, scheduler,
                    progress: TrainingProgress, ema=None, keep: int = 2, run_args: dict | None = None) -> Path:
    """Write the run's state as `directory/step-XXXXXXX` (see the module docstring); keep the newest `keep`.

    Every rank calls it (each writes its RNG state); `model` is the unwrapped model. `run_args` (plain
    values) is saved as `args.json`, for `checkpoint_args`.
    """
    directory = Path(directory)
    temporary = directory / f".partial-step-{step:07d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), temporary / f"rng-rank{accelerator.process_index}.pt")
    if main:
        safetensors.torch.save_model(model, str(temporary / "model.safetensors"))
        torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
        torch.save(dst.state_dict(), temporary / "dst.pt")
        if ema is not None:
            safetensors.torch.save_model(ema.module, str(temporary / "ema.safetensors"))
        (temporary / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (temporary / "progress.json").write_text(json.dumps(progress.state_dict()))
        if run_args is not None:
            (temporary / "args.json").write_text(json.dumps(run_args, indent=1))
    accelerator.wait_for_everyone()
    final = directory / f"step-{step:07d}"
    if main:
        files = sorted(p for p in temporary.iterdir() if p.is_file())
        for path in files:
            _fsync(path)
        manifest = {"format": FORMAT, "step": step, "world_size": accelerator.num_processes,
                    "files": {p.name: _sha256(p) for p in files}}
        write_atomically(temporary / "manifest.json", json.dumps(manifest, indent=1))
        revision = 1
        while final.exists():  # never replace a folder that `latest` may name: take the next free name
            final = directory / f"step-{step:07d}.{revision}"
            revision += 1
        os.replace(temporary, final)
        write_atomically(directory / LATEST, final.name)
        checkpoints = sorted((p for p in directory.glob("step-*") if p.is_dir() and not p.is_symlink()),
                             key=lambda p: p.stat().st_mtime_ns)
        for old in checkpoints[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(resume: str, directory: str | os.PathLike) -> Path | None:
    """The checkpoint folder `--resume` names: a path, or `latest` in `directory` (None if there is none).

    Raises:
        DSTError: the path holds no checkpoint, or `latest` names something outside `directory` (`../x`, an
            absolute path) or a symbolic link.
    """
    if resume != LATEST:
        path = Path(resume)
        if not (path / "manifest.json").is_file():
            raise DSTError(f"--resume {resume}: not a checkpoint folder (it has no manifest.json)")
        return path
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    if pointer.is_symlink():
        raise DSTError(f"{pointer} is a symbolic link; it must be the plain file that save_checkpoint writes.")
    return member(directory, pointer.read_text().strip(), what=f"checkpoint that {pointer}")


def _verified(folder: Path, world_size: int) -> dict:
    """The manifest, after checking that every file it lists is there, inside the folder, with its hash."""
    if not (folder / "manifest.json").exists() and any(folder.glob("custom_checkpoint_*.pkl")):
        raise DSTError(f"{folder} is a checkpoint of dst_prune 0.1, whose state files are pickles; they are never "
                       f"loaded (unpickling can run code). Start a fresh run, or load its model weights alone with "
                       f"dst_prune.load_sparse_state_dict(model, state_dict, masks='nonzero').")
    path = member(folder, "manifest.json")
    if not path.is_file():
        raise DSTError(f"{path} cannot be read (no such file): the checkpoint is incomplete.")
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    step = manifest.get("step") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT or not all(
            isinstance(v, str) for v in files.values()) or isinstance(step, bool) or not isinstance(step, int) \
            or step < 0:
        raise DSTError(f"{path} is not a {FORMAT} manifest (format, step, files and their hashes).")
    if manifest.get("world_size") != world_size:
        raise DSTError(f"{folder} was saved by {manifest.get('world_size')} processes; this run has {world_size}. "
                       f"Resume with the same number of processes (the data order depends on it).")
    for name, expected in files.items():
        file = member(folder, name)
        if not file.is_file() or _sha256(file) != expected:
            raise DSTError(f"{file} is missing or differs from the checkpoint's manifest (truncated, corrupted or "
                           f"from another checkpoint); resume from another checkpoint.")
    return manifest


def checkpoint_args(folder: str | os.PathLike) -> dict | None:
    """The run flags saved in the checkpoint (`args.json`, hash checked), or None for a checkpoint without them.

    Raises:
        DSTError: the manifest or `args.json` is damaged.
    """
    folder = Path(folder)
    manifest = read_json(member(folder, "manifest.json"))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or "args.json" not in files:
        return None
    path = member(folder, "args.json")
    if not path.is_file() or _sha256(path) != files["args.json"]:
        raise DSTError(f"{path} is missing or differs from the checkpoint's manifest; resume from another checkpoint.")
    args = read_json(path)
    if not isinstance(args, dict):
        raise DSTError(f"{path} does not hold the run's flags (a JSON object).")
    return args


def _check_steps(folder: Path, manifest: dict, progress: dict, dst_state: dict) -> int:
    steps = progress["optimizer_steps"]
    if manifest["step"] != steps:
        raise DSTError(f"{folder}/manifest.json is of step {manifest['step']}, progress.json of step {steps}: the "
                       f"files are of different checkpoints.")
    counted = dst_state.get("step_count") if isinstance(dst_state, dict) else None
    if isinstance(counted, int) and not isinstance(counted, bool) and counted > steps:
        raise DSTError(f"{folder}/dst.pt counted {counted} optimizer steps, more than the checkpoint's {steps}: the "
                       f"files are of different checkpoints.")
    return steps


def load_checkpoint(folder: str | os.PathLike, *, accelerator, model, optimizer, dst, scheduler,
                    progress: TrainingProgress, ema=None) -> int:
    """Check the checkpoint in `folder` completely, then load it into the live objects. Returns its step.

    The controller keeps its own update schedule and `total_steps` (built from this run's flags, which may have
    changed), as `DynamicSparsity.load_state_dict`'s resume rule says; everything else comes from the checkpoint.

    Raises:
        DSTError: naming the file that is missing, corrupted, of another run or unreadable; nothing is loaded.
    """
    folder = Path(folder)
    manifest = _verified(folder, accelerator.num_processes)
    rng_path = member(folder, f"rng-rank{accelerator.process_index}.pt")
    progress_state = read_json(member(folder, "progress.json"), allow_nan=True)
    try:
        progress.check(progress_state)
    except DSTError as error:
        raise DSTError(f"{folder}/{error}") from None
    model_state = files_check.read_safetensors(member(folder, "model.safetensors"), model)
    ema_state = files_check.read_safetensors(member(folder, "ema.safetensors"), ema.module) if ema is not None else None
    optimizer_state = files_check.read_torch(member(folder, "optimizer.pt"))
    dst_state = files_check.read_torch(member(folder, "dst.pt"))
    rng = files_check.read_torch(rng_path)
    scheduler_state = read_json(member(folder, "scheduler.json"))
    steps = _check_steps(folder, manifest, progress_state, dst_state)
    files_check.check_optimizer_state(folder / "optimizer.pt", optimizer_state, optimizer, steps)
    files_check.check_scheduler_state(folder / "scheduler.json", scheduler_state, scheduler, steps)
    files_check.check_rng_state(rng_path, rng)
    try:
        dst.check_state_dict(dst_state)
        dst.check_weights(model_state, dst_state)
    except DSTError as error:
        raise DSTError(f"{folder / 'dst.pt'}: {error}") from None
    # everything checked: load
    model.load_state_dict(model_state)
    dst.load_state_dict(dst_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    progress.load_state_dict(progress_state)
    if ema is not None:
        ema.module.load_state_dict(ema_state)
        dst.sync_copies()
    _set_rng_state(rng)
    return manifest["step"]
