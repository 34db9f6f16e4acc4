"""Dynamic sparse training with Hugging Face accelerate: the controller in `save_state`/`load_state`, and the
length of training in the steps each process takes.

    from dst_prune.integrations import accelerate as dst_accelerate

    dst = dst_prune.apply(model, sparsity=0.9, method="rigl", optimizer=optimizer,
                          total_steps=dst_accelerate.total_steps(accelerator, train_dataloader, num_epochs))
    dst.prepare_for_ddp()
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    dst_accelerate.register(accelerator, dst)       # every save_state/load_state now carries the controller

`register` adds a save-state pre-hook that writes `dst.state_dict()` as `dst_state.pt` (tensors and plain
values, read back with `torch.load(weights_only=True)`) and a load-state pre-hook that checks the whole folder
before accelerate loads anything: the controller file is there and valid, every pickle-based file of the
folder holds only tensors and plain values (accelerate reads the files of objects given to
`register_for_checkpointing` with `weights_only=False`, which would run a planted payload), the saved weights
are zero outside the saved masks, and every process read the same state. Only then is the controller
restored; accelerate loads the model, optimizer, schedulers and random states after it.

`accelerator.register_for_checkpointing(dst)` is not needed (and refused alongside `register`): it stores the
controller as a pickle that accelerate unpickles with `weights_only=False`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sized
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.utils import DistributedType
from accelerate.utils import load as accelerate_load
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader

import dst_prune
from dst_prune.errors import DSTError

__all__ = ["CONTROLLER_FILE", "Registration", "register", "total_steps"]

logger = logging.getLogger(__name__)

CONTROLLER_FILE = "dst_state.pt"
#: the files accelerate reads with `torch.load` (everything else it reads is safetensors)
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")
_UNSUPPORTED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


class Registration:
    """The hooks `register` added; `remove()` takes them off the accelerator again."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def register(accelerator: Accelerator, dst: dst_prune.DynamicSparsity) -> Registration:
    """Make every `accelerator.save_state(dir)` save the controller and every `load_state(dir)` restore it.

    Call it once, on every process, after `accelerator.prepare(model, ...)` (before is fine too, as long as the
    sparse model is prepared before the first save or load).

    Args:
        accelerator: the run's `Accelerator`.
        dst: the controller of the model given to `accelerator.prepare`.

    Returns:
        A `Registration` whose `remove()` undoes it.

    Raises:
        DSTError: `dst` is also registered with `accelerator.register_for_checkpointing` (a pickle), or the run
            uses accelerate's FSDP, DeepSpeed or Megatron-LM plugin, which load the model before `load_state`'s
            hooks run (save and load FSDP2 runs with `dst_prune.distributed.checkpoint`).
    """
    if not isinstance(dst, dst_prune.DynamicSparsity):
        raise DSTError(f"dst must be the controller dst_prune.apply returned; received {type(dst).__name__}.")
    if any(obj is dst for obj in accelerator._custom_objects):
        raise DSTError("dst is registered with accelerator.register_for_checkpointing, which saves it as a pickle "
                       "that load_state unpickles with weights_only=False. Drop that call: register() saves it as "
                       f"{CONTROLLER_FILE} (tensors and plain values).")
    if accelerator.distributed_type in _UNSUPPORTED:
        raise DSTError(f"accelerate's {accelerator.distributed_type.value} plugin loads the model before "
                       f"load_state's hooks run, so the weights cannot be checked against the saved masks first. "
                       f"Save and load sharded runs with dst_prune.distributed.checkpoint.save/load instead.")
    if any(isinstance(hook, (_SaveController, _LoadController)) and hook.dst is dst
           for hooks in (accelerator._save_model_state_pre_hook, accelerator._load_model_state_pre_hook)
           for hook in hooks.values()):
        raise DSTError("dst is already registered with this accelerator; call register() once.")
    return Registration([accelerator.register_save_state_pre_hook(_SaveController(accelerator, dst)),
                         accelerator.register_load_state_pre_hook(_LoadController(accelerator, dst))])


# --- where the sparse model is in accelerate's files -------------------------------------------------
def _model_file(accelerator: Accelerator, dst: dst_prune.DynamicSparsity, folder: Path) -> tuple[Path, str]:
    """The weights file of the prepared model that holds `dst.model`, and the key prefix of its state dict."""
    for index, prepared in enumerate(accelerator._models):
        for name, module in prepared.named_modules():
            if module is dst.model:
                ending = f"_{index}" if index else ""
                safetensors_file = folder / f"model{ending}.safetensors"
                path = safetensors_file if safetensors_file.exists() else folder / f"pytorch_model{ending}.bin"
                return path, f"{name}." if name else ""
    raise DSTError("the sparse model (dst.model) is not one of the models given to accelerator.prepare; prepare it "
                   "(model = accelerator.prepare(model)) before save_state/load_state.")


def _saved_weights(path: Path, prefix: str, dst: dst_prune.DynamicSparsity) -> dict[str, torch.Tensor]:
    """The sparse tensors' saved weights, read from `path` alone (safetensors, or a weights-only torch file)."""
    keys = {target.name: prefix + target.name for target in dst.targets}
    if not path.is_file():
        raise DSTError(f"{path.parent} has no model weights file ({path.name}): it is not a complete save_state "
                       f"folder.")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as reader:
                present = set(reader.keys())
                return {name: reader.get_tensor(key) for name, key in keys.items() if key in present}
        state = _read_plain(path)
        return {name: state[key] for name, key in keys.items() if isinstance(state, dict) and key in state}
    except DSTError:
        raise
    except Exception as error:
        raise DSTError(f"{path} cannot be read as model weights ({type(error).__name__}: {str(error)[:200]}); "
                       f"it is refused.") from None


def _read_plain(path: Path) -> object:
    """`torch.load` that admits tensors and plain values only (with accelerate's numpy allowances for its random
    states), memory-mapped so that checking a large file reads its structure, not its tensors."""
    try:
        return accelerate_load(path, map_location="cpu", mmap=True)
    except Exception as error:
        raise DSTError(f"{path} cannot be read as tensors and plain values ({type(error).__name__}: "
                       f"{str(error)[:160]}): it is truncated, corrupted or holds pickled objects, which could run "
                       f"code when unpickled. Nothing was loaded; resume from another checkpoint folder.") from None


# --- agreement across processes ---------------------------------------------------------------------------
def _agree(accelerator: Accelerator, values: list[int]) -> list[list[int]]:
    """Every process's `values` (one all-gather); one process alone gets its own."""
    if accelerator.num_processes == 1:
        return [values]
    local = torch.tensor([values], dtype=torch.int64, device=accelerator.device)
    return accelerator.gather(local).cpu().tolist()


def _digest(state: dict) -> int:
    """60 bits of the controller state's mask digest, to compare across processes."""
    return int(str(state.get("masks_digest", "0"))[:15] or "0", 16)


class _SaveController:
    """Save-state pre-hook: `dst.state_dict()` on every process (a collective under FSDP2), written by the main one."""

    def __init__(self, accelerator: Accelerator, dst: dst_prune.DynamicSparsity) -> None:
        self.accelerator, self.dst = accelerator, dst

    def __call__(self, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        accelerator = self.accelerator
        state = self.dst.state_dict()
        seen = _agree(accelerator, [_digest(state), state["step_count"]])
        if any(values != seen[0] for values in seen):
            raise DSTError(f"the processes hold different masks or steps ({seen}); nothing was saved. Masks must "
                           f"depend only on synced weights, all-reduced scores and the seed: call "
                           f"dst.prepare_for_ddp() before accelerator.prepare and step every process alike.")
        each_node = accelerator.project_configuration.save_on_each_node
        if accelerator.is_main_process or (each_node and accelerator.is_local_main_process):
            path = Path(output_dir) / CONTROLLER_FILE
            temporary = path.with_name(f".{path.name}.partial")
            torch.save(state, temporary)
            os.replace(temporary, path)
            logger.info("dst_prune: saved the controller (step %d) to %s", state["step_count"], path)


class _LoadController:
    """Load-state pre-hook: check the folder completely, agree across processes, then restore the controller."""

    def __init__(self, accelerator: Accelerator, dst: dst_prune.DynamicSparsity) -> None:
        self.accelerator, self.dst = accelerator, dst

    def __call__(self, models: list[nn.Module], input_dir: str) -> None:
        accelerator, folder = self.accelerator, Path(input_dir)
        try:
            state, refusal = self._checked(folder), None
        except Exception as error:  # every process takes part in the agreement below, whatever it met
            state = None
            refusal = error if isinstance(error, DSTError) else DSTError(
                f"{folder} cannot be checked ({type(error).__name__}: {str(error)[:200]}); nothing was loaded.")
        seen = _agree(accelerator, [int(refusal is not None), _digest(state) if state else 0])
        if refusal is not None:
            raise refusal
        refused = [rank for rank, (failed, _) in enumerate(seen) if failed]
        if refused:
            raise DSTError(f"process(es) {refused} refused the checkpoint {folder} (see their error); nothing was "
                           f"loaded.")
        if len({digest for _, digest in seen}) > 1:
            raise DSTError(f"the processes read different controller states from {folder / CONTROLLER_FILE} (one "
                           f"file per node that differ?); nothing was loaded.")
        self.dst.load_state_dict(state)
        logger.info("dst_prune: restored the controller (step %d) from %s", self.dst.step_count, folder)

    def _checked(self, folder: Path) -> dict:
        """Every check, reading files only; returns the controller state to load."""
        dst, accelerator = self.dst, self.accelerator
        path = folder / CONTROLLER_FILE
        if not path.is_file():
            raise DSTError(f"{folder} has no {CONTROLLER_FILE}: it was saved without "
                           f"dst_prune.integrations.accelerate.register (a dense run, or another script). Resume a "
                           f"sparse run's checkpoint, or start afresh.")
        contents = {p.name: _read_plain(p) for p in sorted(folder.iterdir())
                    if p.is_file() and p.suffix in _PICKLE_SUFFIXES}
        state = contents[CONTROLLER_FILE]
        try:
            dst.check_state_dict(state)
        except DSTError as error:
            raise DSTError(f"{path}: {error}") from None
        weights_file, prefix = _model_file(accelerator, dst, folder)
        weights = _saved_weights(weights_file, prefix, dst)
        missing = [t.name for t in dst.targets if t.name not in weights]
        if missing:
            raise DSTError(f"{weights_file} has no {prefix}{missing[0]} (and {len(missing) - 1} more sparse "
                           f"tensors): it is the checkpoint of another model.")
        try:
            dst.check_weights(weights, state)
        except DSTError as error:
            raise DSTError(f"{weights_file} and {path} do not belong together: {error}") from None
        for index, optimizer in enumerate(accelerator._optimizers):
            name = "optimizer.bin" if index == 0 else f"optimizer_{index}.bin"
            saved = contents.get(name)
            groups = saved.get("param_groups") if isinstance(saved, dict) else None
            if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != \
                    [len(g["params"]) for g in optimizer.param_groups]:
                raise DSTError(f"{folder / name} is missing or is the state of another optimizer (other parameter "
                               f"groups); nothing was loaded.")
        return state


# --- the length of training, per process -------------------------------------------------------------------
def _batches_per_process(accelerator: Accelerator, loader_or_len: object) -> int:
    """Batches one process takes per epoch, as accelerate shards them (`BatchSamplerShard`/`DataLoaderDispatcher`)."""
    if isinstance(loader_or_len, DataLoaderStateMixin):  # prepared: already one process's share
        return len(loader_or_len)
    if isinstance(loader_or_len, bool) or not isinstance(loader_or_len, (int, DataLoader)):
        raise DSTError(f"loader_or_len must be a DataLoader (prepared or not) or len(loader) before "
                       f"accelerator.prepare; received {type(loader_or_len).__name__}.")
    try:
        batches = loader_or_len if isinstance(loader_or_len, int) else len(loader_or_len)
    except TypeError:
        raise DSTError("the loader has no length (an iterable dataset): pass its number of batches per epoch "
                       "before accelerator.prepare as loader_or_len.") from None
    processes = accelerator.num_processes
    if isinstance(loader_or_len, int) and processes > 1 and \
            any(len(prepared) == batches for prepared in accelerator._dataloaders if isinstance(prepared, Sized)):
        logger.warning("dst_prune: total_steps got %d batches per epoch, the length of a loader accelerate already "
                       "prepared (one process's share); it is read as the length before prepare and divided by %d "
                       "processes. Pass the loader itself to avoid the ambiguity.", batches, processes)
    drop_last = bool(getattr(loader_or_len, "drop_last", False))
    if processes == 1 or accelerator.split_batches or batches % processes == 0:
        return batches if processes == 1 or accelerator.split_batches else batches // processes
    if drop_last:
        return batches // processes
    if accelerator.even_batches:
        return math.ceil(batches / processes)
    raise DSTError(f"{batches} batches over {processes} processes with even_batches=False: the processes take "
                   f"different numbers of steps, which the masks cannot follow. Use even_batches=True (accelerate's "
                   f"default) or drop_last=True.")


def total_steps(accelerator: Accelerator, loader_or_len: object, epochs: int, grad_accum: int | None = None) -> int:
    """The optimizer steps each process takes in `epochs` epochs: what `dst.step()` counts, `total_steps` for `apply`.

    `epochs * len(train_dataloader)` taken before `accelerator.prepare` counts the batches of all processes
    together (twice each process's steps on 2 processes), which stretches RigL's schedule (its stop step, its
    drop-fraction decay) over more steps than the run takes. This counts one process's share, as accelerate
    splits the batches, divided by the gradient accumulation (a step per `grad_accum` batches, and one at the
    end of each epoch, as `accelerator.accumulate` syncs at the end of the loader).

    Args:
        accelerator: the run's `Accelerator` (its number of processes, `split_batches`, `even_batches`).
        loader_or_len: the training `DataLoader`, before or after `accelerator.prepare`, or its length before
            `prepare` (an iterable dataset's number of batches per epoch).
        epochs: the number of epochs.
        grad_accum: batches per optimizer step; default the accelerator's `gradient_accumulation_steps`.

    Raises:
        DSTError: not a positive number of epochs or accumulation steps, a loader without length, or a sharding
            in which processes take different numbers of steps.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DSTError(f"epochs must be a positive integer; received {epochs!r}.")
    grad_accum = accelerator.gradient_accumulation_steps if grad_accum is None else grad_accum
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise DSTError(f"grad_accum must be a positive integer (batches per optimizer step); received {grad_accum!r}.")
    batches = _batches_per_process(accelerator, loader_or_len)
    if accelerator.gradient_state.sync_with_dataloader:
        steps = epochs * math.ceil(batches / grad_accum)
    else:
        steps = epochs * batches // grad_accum
    if steps < 1:
        raise DSTError(f"{epochs} epochs of {batches} batches per process with grad_accum={grad_accum} make no "
                       f"optimizer step.")
    return steps
