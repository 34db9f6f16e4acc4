"""The controller's checkpoint: masks and everything else an exact resume needs, as tensors and plain values.

`build_state` holds no Python objects, so `torch.load(path, weights_only=True)` reads it (and so does
anything that stores tensors and JSON). `check_state` checks all of it (format, types, the resume rule of
`dst_prune.config`, lengths, every mask's shape, digest, groups and count against the budget) and
returns what `DynamicSparsity.load_state_dict` sets, so a refused state changes nothing.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._bits import pack_bits, packed_length, unpack_bits
from .._masking.hook import DSTHook
from .._masking.target import SparseTarget
from ..algorithms.base import SparseAlgorithm
from ..algorithms.context import SparsityContext
from ..budget.distributions import total_budget
from ..config import IDENTITY_FIELDS, SparsityConfig, describe
from ..errors import DSTError
from ..schedules import UpdateSchedule

__all__ = ["STATE_FORMAT", "CheckedState", "MaskCountCheck", "build_state", "check_state", "check_weights",
           "masks_digest", "refuse_objects"]

STATE_FORMAT = "dst_prune.DynamicSparsity/3"
_OLD_FORMAT = "dst_prune.DynamicSparsity/2"  # masks in the model's state dict (torch prune's form)


def masks_digest(packed: Sequence[torch.Tensor]) -> str:
    """A hex digest of bit-packed masks, to detect a flipped byte in a checkpoint."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in packed:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _refuse(what: str) -> DSTError:
    return DSTError(f"the controller state {what}; it is truncated, corrupted or not a DynamicSparsity.state_dict().")


def _integer(state: Mapping, key: str, minimum: int = 0) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(f"has {key}={value!r}, not an integer >= {minimum}")
    return value


def _packed_list(state: Mapping, key: str, targets: Sequence[SparseTarget]) -> list[torch.Tensor]:
    values = state.get(key)
    if not isinstance(values, (list, tuple)) or len(values) != len(targets):
        raise _refuse(f"has no '{key}' list of {len(targets)} tensors")
    for value, target in zip(values, targets):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1 or \
                value.numel() != packed_length(target.numel):
            raise _refuse(f"'{key}' entry of {target.name} is not its {packed_length(target.numel)} packed bytes")
    return list(values)


def build_state(*, targets: Sequence[SparseTarget], context: SparsityContext, algorithm: SparseAlgorithm,
                ever_active: Sequence[torch.Tensor], history: Sequence[dict]) -> dict:
    """Masks (bit-packed, with a digest), budget, step, schedule, configuration, the algorithm's state, history.

    Raises:
        DSTError: the algorithm's state or the history holds something other than tensors and plain values
            (it could not be loaded back with `weights_only=True`).
    """
    config = context.config
    masks = [pack_bits(t.full_mask()).cpu() for t in targets]  # (sharded: gathered, on every rank)
    state = {
        "format": STATE_FORMAT, "method": algorithm.name, "targets": [t.name for t in targets],
        "sparsity": config.sparsity, "granularity": config.granularity,
        "budget": context.budget, "seed": config.seed,
        "step_count": context.step, "update_index": context.update_index,
        "schedule": context.schedule.state_dict(), "total_steps": config.total_steps,
        "algorithm": algorithm.state_dict(), "hyperparameters": describe(algorithm.hyperparameter_values()),
        "masks": masks, "masks_digest": masks_digest(masks),
        "ever_active": [m.clone().cpu() for m in ever_active], "config": config.state_dict(),
        "history": list(history),
    }
    refuse_objects(state["algorithm"], f"method={algorithm.name!r}'s state_dict()")
    refuse_objects(state["history"], f"method={algorithm.name!r}'s metrics() (the history)")
    return state


_PLAIN = (str, int, float, bool, type(None))


def refuse_objects(value: object, where: str, path: str = "") -> None:
    """Refuse anything `torch.load(weights_only=True)` could not read back (numpy scalars, objects)."""
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):  # (exact types: a numpy float is a float)
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            refuse_objects(item, where, f"{path}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) not in _PLAIN:
                raise DSTError(f"{where} has the key {key!r} ({type(key).__name__}) at {path or 'the top'}; a "
                               f"checkpoint holds only str/int/float/bool/None keys. Convert it.")
            refuse_objects(item, where, f"{path}[{key!r}]")
        return
    raise DSTError(f"{where} holds {type(value).__module__}.{type(value).__qualname__} at {path or 'the top'}; a "
                   f"checkpoint holds only tensors and plain Python values (it is read with weights_only=True). "
                   f"Convert it, e.g. float(x) for a numpy scalar.")


@dataclass
class CheckedState:
    """What `load_state_dict` sets, after every check passed."""

    step: int
    update_index: int
    budget: int
    algorithm: dict
    masks: list[torch.Tensor] | None  # None: the old format, whose masks come with the model's state dict
    ever_active: list[torch.Tensor]
    history: list[dict]
    changed: list[str]  # the adjustable fields whose new values differ from the saved ones (logged)


def _saved_view(state: Mapping) -> dict:
    """The saved configuration, in `SparsityConfig.state_dict()`'s terms (older states kept fewer fields)."""
    saved = dict(state["config"]) if isinstance(state.get("config"), Mapping) else {}
    saved.update({"method": state.get("method"), "sparsity": state.get("sparsity"), "seed": state.get("seed"),
                  "granularity": state.get("granularity", saved.get("granularity", "element"))})
    return saved


def _check_identity(state: Mapping, config: SparsityConfig, targets: Sequence[SparseTarget]) -> None:
    if not isinstance(state.get("method"), str):
        raise _refuse("names no method")
    names = [t.name for t in targets]
    if state.get("targets") != names:
        saved = state.get("targets") if isinstance(state.get("targets"), list) else []
        differ = sorted(set(map(str, saved)) ^ set(names))[:5] or ["(same names, other order)"]
        raise DSTError(f"state was saved for other sparse tensors (differ: {', '.join(differ)}). Apply "
                       f"with the same include/exclude/dense_stem_and_head as the saved run.")
    saved, current = _saved_view(state), config.state_dict()
    for name in IDENTITY_FIELDS:
        if name not in saved or saved[name] == current[name]:
            continue
        if name == "distribution" and (saved.get("loaded") or config.loaded):
            continue  # masks taken from a checkpoint: no distribution was chosen
        raise DSTError(f"the controller state was saved with {name}={saved[name]!r}; this controller was applied "
                       f"with {name}={current[name]!r}. A resumed run keeps {name}: apply with "
                       f"{name}={saved[name]!r}, or start a new run.")


def _adjusted(state: Mapping, context: SparsityContext, algorithm: SparseAlgorithm) -> list[str]:
    """The adjustable fields whose saved values differ from the new ones (`dst_prune.config`, the resume rule)."""
    pairs = {"schedule": (state.get("schedule"), context.schedule.state_dict()),
             "total_steps": (state.get("total_steps"), context.config.total_steps),
             "hyperparameters": (state.get("hyperparameters"), describe(algorithm.hyperparameter_values()))}
    return [name for name, (old, new) in pairs.items() if old is not None and old != new]


def _checked_masks(state: Mapping, targets: Sequence[SparseTarget], budget: int) -> list[torch.Tensor] | None:
    if state["format"] == _OLD_FORMAT:
        return None
    packed = _packed_list(state, "masks", targets)
    if state.get("masks_digest") != masks_digest(packed):
        raise _refuse("has masks whose digest does not match (a flipped or mixed byte)")
    masks, active = [], 0
    for target, values in zip(targets, packed):
        mask = unpack_bits(values.to(target.mask.device), target.shape)
        if not target.grouping.is_whole(mask):
            raise DSTError(f"{target.name}: the saved mask is not made of whole {target.grouping.name} groups; "
                           f"it was saved with another granularity.")
        groups = int(torch.count_nonzero(target.grouping.group_mask(mask)))
        if not groups:
            raise _refuse(f"leaves {target.name} with no active weight")
        active += groups
        masks.append(mask)
    if active != budget:
        raise _refuse(f"has masks with {active} active weights (groups) but a budget of {budget}")
    return masks


def check_state(state: object, *, targets: Sequence[SparseTarget], context: SparsityContext,
                algorithm: SparseAlgorithm) -> CheckedState:
    """Every check of `load_state_dict`, in the order that names the first problem most usefully.

    Raises:
        DSTError: anything that does not fit this controller; nothing has been changed.
    """
    if not isinstance(state, Mapping) or state.get("format") not in (STATE_FORMAT, _OLD_FORMAT):
        raise DSTError(f"state is not a DynamicSparsity.state_dict() (format {STATE_FORMAT!r}).")
    if state.get("method") != algorithm.name and isinstance(state.get("method"), str):
        raise DSTError(f"state was saved by method={state['method']!r}; this controller runs "
                       f"method={algorithm.name!r}. Call dst_prune.apply with method={state['method']!r}.")
    _check_identity(state, context.config, targets)
    for key in ("seed", "step_count", "update_index"):
        _integer(state, key)
    budget = _integer(state, "budget", minimum=1)
    n_groups = sum(t.n_groups for t in targets)
    if budget > n_groups:
        raise _refuse(f"has a budget of {budget} for {n_groups} groups")
    expected = total_budget(context.config.sparsity, n_groups)
    if not algorithm.gradual and budget != expected:
        raise DSTError(f"the controller state keeps {budget} active weights (groups) of {n_groups}, but "
                       f"sparsity={context.config.sparsity} keeps exactly {expected}: the state is not what its "
                       f"sparsity says (edited or corrupted). Load a state saved by a controller of this sparsity.")
    try:
        UpdateSchedule(**state["schedule"])
    except (KeyError, TypeError, DSTError) as error:
        raise _refuse(f"has no valid schedule ({error})") from None
    total_steps = state.get("total_steps")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps < 1):
        raise _refuse(f"has total_steps={total_steps!r}")
    ever_active = _packed_list(state, "ever_active", targets)
    history = state.get("history")
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise _refuse("has no history list")
    if not isinstance(state.get("algorithm"), dict):
        raise _refuse("has no algorithm state")
    algorithm.check_state(state["algorithm"])
    masks = _checked_masks(state, targets, budget)
    return CheckedState(step=state["step_count"], update_index=state["update_index"], budget=budget,
                        algorithm=state["algorithm"], masks=masks, ever_active=ever_active, history=list(history),
                        changed=_adjusted(state, context, algorithm))


def check_weights(model_state: Mapping, masks: Sequence[torch.Tensor] | None, targets: Sequence[SparseTarget]) -> None:
    """Refuse a model state dict with non-zero weights outside `masks` (the masks of a checked controller state).

    The weights of a sparse model are zero wherever its mask is, so a non-zero there means the two come
    from different steps or runs.
    """
    for target, mask in zip(targets, masks or []):
        weight = model_state.get(target.name)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == tuple(mask.shape) and \
                bool(weight.detach().to(mask.device)[~mask].any()):
            raise DSTError(f"{target.name}: the model's weights are non-zero outside the saved mask: the model "
                           f"state and the controller state are of different steps or runs.")


class MaskCountCheck(DSTHook):
    """Load pre-hook of the root model: refuse masks (torch prune's form) whose count the controller cannot keep.

    Runs before any tensor is loaded, so a refused state dict leaves the model as it was. For a method
    with a constant budget the count must be exactly the budget; a gradual method's count is checked at
    its next update (its controller state may come after the model's).
    """

    def __init__(self, controller: object) -> None:
        self.controller = weakref.ref(controller)

    def __call__(self, module: nn.Module, state: dict, prefix: str, *args: object) -> None:
        controller = self.controller()
        if controller is None or controller.algorithm.gradual or module is not controller.model:
            return
        keys = [prefix + t.name + "_mask" for t in controller.targets]
        if not any(k in state for k in keys):
            return
        active = 0
        for key, target in zip(keys, controller.targets):
            mask = state.get(key, target.mask)
            if tuple(mask.shape) != tuple(target.shape):
                return  # load_state_dict itself reports the shape mismatch
            active += int(torch.count_nonzero(target.grouping.group_mask(mask.to(torch.bool))))
        if active != controller.budget:
            raise DSTError(f"the state dict's masks hold {active} active weights (groups) but the controller keeps "
                           f"exactly {controller.budget}: they are of another run. Load a state dict saved with "
                           f"this model's controller, or rebuild with dst_prune.load_sparse_state_dict(...).")
