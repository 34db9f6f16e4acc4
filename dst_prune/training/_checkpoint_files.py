"""Reading the files of a checkpoint folder without trusting them: every check `load_checkpoint` makes first.

Each function reads or checks one file and raises a `DSTError` naming it when it is not what the live
run expects; none of them changes anything. The checks: names that stay inside the folder (no `../x`,
no absolute path, no symbolic link), JSON and safetensors headers without duplicate keys, tensors of
the model's dtype with finite values, optimizer state that fits the live parameters (shapes, dtypes,
step counts, parameter groups), an LR schedule state of the live scheduler's keys and types, and random
generator states that the generators accept.
"""

from __future__ import annotations

import json
import math
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from ..errors import DSTError
from ..loading import complete_state_dict

__all__ = ["check_optimizer_state", "check_rng_state", "check_scheduler_state", "member", "read_json",
           "read_safetensors", "read_torch"]

_MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is not one
_NUMBER = (int, float)


def member(folder: Path, name: object, what: str = "file") -> Path:
    """`folder / name` for a plain file name that stays inside `folder` and is no symbolic link.

    Raises:
        DSTError: `name` is not a plain name (`../x`, `a/b`, an absolute path), or the entry is a symbolic link.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise DSTError(f"{folder}: the {what} name {name!r} leaves the checkpoint folder (only plain names inside "
                       f"it are accepted); the checkpoint is damaged or was tampered with.")
    path = folder / name
    if path.is_symlink():
        raise DSTError(f"{path} is a symbolic link (to {path.readlink()}); checkpoints hold plain files only, so it "
                       f"is refused. Copy the real files into the checkpoint folder.")
    return path


def _no_duplicates(path: Path):
    def pairs(items: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in items]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise DSTError(f"{path} holds the key {duplicates[0]!r} twice; which one counts is ambiguous, so the "
                           f"file is refused.")
        return dict(items)
    return pairs


def read_json(path: Path, allow_nan: bool = False) -> object:
    """The JSON value of `path`; refuses invalid JSON, duplicate keys and (unless `allow_nan`) NaN/Infinity."""
    def constant(name: str) -> float:
        if allow_nan:
            return float(name)
        raise DSTError(f"{path} holds {name}, which is not JSON; the file is refused.")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_no_duplicates(path), parse_constant=constant)
    except (OSError, ValueError) as error:
        if isinstance(error, DSTError):
            raise
        raise DSTError(f"{path} is not valid JSON ({error}).") from None


def read_torch(path: Path) -> object:
    """`torch.load(weights_only=True)` of `path`: tensors and plain values only, no duplicate archive entries."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if len(names) != len(set(names)):
            raise DSTError(f"{path} holds an archive entry twice; the file is refused.")
        return torch.load(path, map_location="cpu", weights_only=True)
    except DSTError:
        raise
    except Exception as error:
        raise DSTError(f"{path} cannot be read as tensors and plain values ({type(error).__name__}: "
                       f"{str(error)[:200]}); it is refused.") from None


def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as f:
        prefix = f.read(8)
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < size <= _MAX_HEADER:
            raise DSTError(f"{path} is not a safetensors file (header size {size}).")
        text = f.read(size)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(path))
    except DSTError:
        raise
    except ValueError as error:
        raise DSTError(f"{path} is not a safetensors file ({error}).") from None


def read_safetensors(path: Path, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in `path`, checked against `module`: keys, shapes, dtypes and finite values.

    Raises:
        DSTError: naming the file and the tensor.
    """
    _safetensors_header(path)
    try:
        state = safetensors.torch.load_file(str(path))
    except Exception as error:
        raise DSTError(f"{path} is not a readable safetensors file ({error}).") from None
    state = complete_state_dict(module, state, source=str(path))
    own = module.state_dict()
    for key, value in state.items():
        if value.dtype != own[key].dtype:
            raise DSTError(f"{key}: the tensor in {path} is {value.dtype}, the model's is {own[key].dtype}; a "
                           f"checkpoint of this run holds the model's own dtypes, so it is refused.")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise DSTError(f"{key}: the tensor in {path} has {bad} non-finite values (NaN or inf) of {value.numel()}; "
                           f"the run had diverged when it was saved. Resume from an earlier checkpoint.")
    return state


def _plain(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int, str))


def _same_kind(saved: object, live: object, open_none: bool = False) -> bool:
    """Whether `saved` has the type (and length, keys) of `live`; with `open_none`, a `None` in `live` (an
    optimizer option left to its default, e.g. `foreach`) accepts any plain scalar."""
    if live is None:
        return saved is None or (open_none and _plain(saved) and not isinstance(saved, (list, tuple)))
    if isinstance(live, bool) or isinstance(saved, bool):
        return isinstance(live, bool) and isinstance(saved, bool)
    if isinstance(live, _NUMBER):
        return isinstance(saved, _NUMBER) and math.isfinite(saved)
    if isinstance(live, str):
        return isinstance(saved, str)
    if isinstance(live, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(live) and \
            all(_same_kind(s, v) for s, v in zip(saved, live))
    if isinstance(live, dict):
        return isinstance(saved, dict) and saved.keys() == live.keys() and \
            all(_same_kind(saved[k], live[k]) for k in live)
    if isinstance(live, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.shape == live.shape and saved.dtype == live.dtype
    return False


def _step_value(value: object) -> float | None:
    """A step count as a number, or None if it is not a finite non-negative whole number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, _NUMBER) or not math.isfinite(value):
        return None
    return value if value >= 0 and float(value).is_integer() else None


def _check_groups(path: Path, groups: object, live_groups: list[dict]) -> list[int]:
    if not isinstance(groups, list) or len(groups) != len(live_groups) or not all(isinstance(g, dict) for g in groups):
        raise DSTError(f"{path} is the state of another optimizer: {len(live_groups)} parameter groups expected.")
    ids: list[int] = []
    for index, (group, live) in enumerate(zip(groups, live_groups)):
        params = group.get("params")
        if not isinstance(params, list) or len(params) != len(live["params"]) or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in params):
            raise DSTError(f"{path}: parameter group {index} does not hold {len(live['params'])} parameter indices; "
                           f"it is the state of another optimizer or model.")
        ids += params
        for key, value in live.items():
            if key == "params":
                continue
            if key not in group:
                raise DSTError(f"{path}: parameter group {index} has no {key!r}; it is not a state of this optimizer.")
            if not _same_kind(group[key], value, open_none=True):
                raise DSTError(f"{path}: parameter group {index} has {key}={group[key]!r}, not a value of the kind "
                               f"of {value!r}; the file is refused.")
        unknown = [k for k in group if k not in live and k != "params" and not _plain(group[k])]
        if unknown:
            raise DSTError(f"{path}: parameter group {index} holds {unknown[0]!r}={group[unknown[0]]!r}, not a "
                           f"plain value; the file is refused.")
    if len(set(ids)) != len(ids):
        raise DSTError(f"{path} names a parameter index twice in its parameter groups; the file is refused.")
    return ids


def check_optimizer_state(path: Path, state: object, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Refuse an `optimizer.state_dict()` that the live optimizer would load but could not step with.

    Checks the parameter groups (count, sizes, the live groups' hyperparameters present with values of
    their kind) and every per-parameter entry: a tensor of the parameter's shape has its dtype and finite
    values, any other tensor is a scalar, and a `step` count is a whole number in [0, `steps`].

    Raises:
        DSTError: naming `path`, the parameter group or the parameter's index, and what differs.
    """
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise DSTError(f"{path} is not an optimizer.state_dict() (keys 'state' and 'param_groups').")
    live_groups = optimizer.param_groups
    ids = _check_groups(path, state["param_groups"], live_groups)
    params = dict(zip(ids, (p for g in live_groups for p in g["params"])))
    entries = state["state"]
    if not isinstance(entries, dict):
        raise DSTError(f"{path}: 'state' is not a mapping of parameter index to its state.")
    for index, entry in entries.items():
        param = params.get(index)
        if param is None or not isinstance(entry, dict):
            raise DSTError(f"{path}: the state of parameter {index!r} names no parameter of its groups.")
        for key, value in entry.items():
            where = f"{path}: state {key!r} of parameter {index} (shape {tuple(param.shape)})"
            if key == "step":
                step = _step_value(value)
                if step is None or step > steps:
                    raise DSTError(f"{where} is step {value!r}; expected a whole number in [0, {steps}] (the "
                                   f"checkpoint's optimizer steps).")
            elif isinstance(value, torch.Tensor):
                if value.shape == param.shape:
                    if value.dtype != param.dtype:
                        raise DSTError(f"{where} is {value.dtype}, the parameter is {param.dtype}.")
                elif value.numel() != 1:
                    raise DSTError(f"{where} has shape {tuple(value.shape)}; it is the state of another model.")
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise DSTError(f"{where} holds non-finite values (NaN or inf): the run had diverged.")
            elif not _plain(value):
                raise DSTError(f"{where} is {type(value).__name__}, not a tensor or a plain value.")


def check_scheduler_state(path: Path, state: object, scheduler: object, steps: int) -> None:
    """Refuse an LR schedule state whose keys or value types are not the live scheduler's.

    Raises:
        DSTError: naming `path` and the key.
    """
    live = scheduler.state_dict()
    if not isinstance(state, dict):
        raise DSTError(f"{path} is not the state of this run's LR schedule (a JSON object expected).")
    unknown = sorted(set(state) - set(live))
    missing = sorted({"base_lrs", "last_epoch"} & set(live) - set(state))
    if unknown or missing:
        raise DSTError(f"{path} is not the state of this run's LR schedule (unknown keys {unknown}, missing "
                       f"{missing}).")
    for key, value in state.items():
        if not _same_kind(value, live[key]):
            raise DSTError(f"{path}: {key}={value!r} is not a value of the kind of {live[key]!r}; the file is refused.")
    last = state.get("last_epoch")
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= steps):
        raise DSTError(f"{path}: last_epoch={last!r}; expected a whole number in [0, {steps}] (the checkpoint's "
                       f"optimizer steps).")


def _int_list(value: object, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and \
        all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in value)


def check_rng_state(path: Path, state: object) -> None:
    """Refuse random generator states that torch, Python's `random` or numpy would not accept (tried on copies).

    Raises:
        DSTError: naming `path` and the generator.
    """
    if not isinstance(state, dict) or not {"torch", "python", "python_gauss", "numpy_keys", "numpy"} <= set(state):
        raise DSTError(f"{path} holds no random number generator state (torch, python, numpy).")
    problem = None
    torch_state, keys, numpy_state = state["torch"], state["numpy_keys"], state["numpy"]
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8 or torch_state.dim() != 1:
        problem = "its torch state is not a 1-D uint8 tensor"
    elif not _int_list(state["python"], 625) or not (state["python_gauss"] is None or
                                                      isinstance(state["python_gauss"], float)):
        problem = "its Python state is not 625 integers and a float or None"
    elif not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or tuple(keys.shape) != (624,) or \
            not bool(((keys >= 0) & (keys < 2**32)).all()):
        problem = "its numpy keys are not 624 unsigned 32-bit integers"
    elif not isinstance(numpy_state, list) or len(numpy_state) != 3 or \
            not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(numpy_state, (int, int, float))):
        problem = "its numpy position is not [int, int, float]"
    elif "cuda" in state and (not isinstance(state["cuda"], list) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in state["cuda"])):
        problem = "its CUDA states are not uint8 tensors"
    if problem is None:
        try:
            torch.Generator().set_state(torch_state)
            random.Random().setstate((3, tuple(state["python"]), state["python_gauss"]))
            position, has_gauss, cached = numpy_state
            np.random.RandomState().set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
        except (RuntimeError, TypeError, ValueError) as error:
            problem = f"a generator refuses it ({error})"
    if problem is not None:
        raise DSTError(f"{path}: {problem}; the file is refused.")

