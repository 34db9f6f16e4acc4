"""Checkpoints of compact optimizer state: validated before loading, index maps kept as integers.

A compact state entry holds the index map of the positions it covers (`active_indices`, an int tensor) beside
its 1-D per-weight tensors. `torch.optim.Optimizer.load_state_dict` casts every non-step state tensor to the
parameter's dtype, which would turn the index map into floats; it is taken out before and put back after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain

import torch

from ..errors import DSTError

__all__ = ["check_state_dict", "restore_indices", "split_indices"]


def _saved_to_params(state_dict: dict, params: Sequence[torch.Tensor]) -> dict:
    """The saved parameter ids mapped to this optimizer's parameters, as torch maps them (group by group)."""
    saved = list(chain.from_iterable(g.get("params", []) for g in state_dict.get("param_groups", [])))
    return dict(zip(saved, params)) if len(saved) == len(params) else {}


def check_state_dict(state_dict: object, params: Sequence[torch.Tensor], per_weight: Sequence[str],
                     name_of: Callable[[torch.Tensor], str], indices_key: str) -> None:
    """Refuse a state dict whose compact or dense per-weight state does not fit the parameters.

    Raises:
        DSTError: naming the parameter, what it holds and what was expected.
    """
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        raise DSTError(f"an optimizer state dict must be a dict with 'state' and 'param_groups' (as "
                       f"optimizer.state_dict() returns); received {type(state_dict).__name__}.")
    mapping = _saved_to_params(state_dict, params)
    for key, entry in state_dict["state"].items():
        param = mapping.get(key)
        if param is None or not isinstance(entry, dict):
            continue  # torch itself refuses mismatched groups
        name = name_of(param)
        indices = entry.get(indices_key)
        tensors = {k: entry[k] for k in per_weight if isinstance(entry.get(k), torch.Tensor)}
        if indices is None:
            for k, value in tensors.items():
                if value.shape != param.shape:
                    raise DSTError(f"the optimizer state {k!r} of {name} has shape {tuple(value.shape)} but the "
                                   f"parameter has shape {tuple(param.shape)}, and no {indices_key!r} says which "
                                   f"weights it covers. Load the state dict saved with this model.")
            continue
        _check_indices(indices, param, name, indices_key)
        for k, value in tensors.items():
            if value.shape != indices.shape:
                raise DSTError(f"the compact optimizer state {k!r} of {name} has shape {tuple(value.shape)} but its "
                               f"{indices_key!r} lists {indices.numel()} positions; the checkpoint is inconsistent. "
                               f"Load an unmodified optimizer.state_dict().")


def _check_indices(indices: object, param: torch.Tensor, name: str, key: str) -> None:
    if not isinstance(indices, torch.Tensor) or indices.ndim != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise DSTError(f"the optimizer state {key!r} of {name} must be a 1-D int32/int64 tensor of positions; "
                       f"received {type(indices).__name__} {getattr(indices, 'dtype', '')}.")
    if indices.numel():
        first, last = int(indices[0]), int(indices[-1])
        increasing = indices.numel() < 2 or bool((indices[1:] > indices[:-1]).all())
        if first < 0 or last >= param.numel() or not increasing:
            raise DSTError(f"the optimizer state {key!r} of {name} must list distinct positions in [0, "
                           f"{param.numel()}) in ascending order; received values from {first} to {last}"
                           f"{'' if increasing else ', not ascending'}. The checkpoint belongs to another model.")


def split_indices(state_dict: dict, indices_key: str) -> tuple[dict, dict]:
    """A shallow copy of `state_dict` without the index maps, and the index maps by saved parameter id."""
    indices, state = {}, {}
    for key, entry in state_dict["state"].items():
        if isinstance(entry, dict) and indices_key in entry:
            entry = dict(entry)
            indices[key] = entry.pop(indices_key)
        state[key] = entry
    return {**state_dict, "state": state}, indices


def restore_indices(state: dict, params: Sequence[torch.Tensor], indices: dict, indices_key: str,
                    state_dict: dict) -> None:
    """Put the index maps back into the loaded state, on their parameters' devices."""
    mapping = _saved_to_params(state_dict, params)
    for key, value in indices.items():
        param = mapping[key]
        state[param][indices_key] = value.to(param.device)
