"""The controller's checkpoint: masks and everything else an exact resume needs, as tensors and plain values.

`state_dict()` holds no Python objects, so `torch.load(path, weights_only=True)` reads it (and so does
anything that stores tensors and JSON). `load_state_dict` checks all of it first (configuration, types,
lengths, every mask's shape, digest, groups and count against the saved budget) and changes nothing
unless everything fits.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from .bits import pack_bits, packed_length, unpack_bits
from .distributed import mask_digest
from .errors import DSTError
from .masking import DSTHook
from .schedules import UpdateSchedule

if TYPE_CHECKING:
    from .sparsity import DynamicSparsity

__all__ = ["STATE_FORMAT", "ControllerState", "MaskCountCheck", "masks_digest"]

STATE_FORMAT = "dst_prune.DynamicSparsity/3"
_OLD_FORMAT = "dst_prune.DynamicSparsity/2"  # masks in the model's state dict (torch prune's form)


def masks_digest(packed: list[torch.Tensor]) -> str:
    """A hex digest of bit-packed masks, to detect a flipped byte in a checkpoint."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in packed:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _refuse(what: str) -> DSTError:
    return DSTError(f"the controller state {what}; it is truncated, corrupted or not a DynamicSparsity.state_dict().")


def _integer(state: dict, key: str, minimum: int = 0) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(f"has {key}={value!r}, not an integer >= {minimum}")
    return value


def _packed_list(state: dict, key: str, targets: list) -> list[torch.Tensor]:
    values = state.get(key)
    if not isinstance(values, (list, tuple)) or len(values) != len(targets):
        raise _refuse(f"has no '{key}' list of {len(targets)} tensors")
    for value, target in zip(values, targets):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or \
                value.numel() != packed_length(target.numel):
            raise _refuse(f"'{key}' entry of {target.name} is not its {packed_length(target.numel)} packed bytes")
    return list(values)


class ControllerState:
    """`state_dict` / `load_state_dict` of `DynamicSparsity`."""

    def state_dict(self: DynamicSparsity) -> dict:
        """Masks (bit-packed, with a digest), budget, step, schedule, the algorithm's state, history.

        Plain Python values and tensors only.
        """
        context = self.context
        self._sync_sharding()
        masks = [pack_bits(t.full_mask()).cpu() for t in self.targets]  # (sharded: gathered, on every rank)
        return {
            "format": STATE_FORMAT, "method": self.method, "targets": [t.name for t in self.targets],
            "sparsity": context.target_sparsity, "granularity": self.config.get("granularity", "element"),
            "budget": context.budget, "seed": context.seed,
            "step_count": context.step, "update_index": context.update_index,
            "schedule": context.schedule.state_dict(), "total_steps": context.total_steps,
            "algorithm": self.algorithm.state_dict(),
            "masks": masks, "masks_digest": masks_digest(masks),
            "ever_active": [m.clone().cpu() for m in self.ever_active], "config": dict(self.config),
            "history": list(self.history),
        }

    def _check_configuration(self: DynamicSparsity, state: dict) -> None:
        if state["method"] != self.method:
            raise DSTError(f"state was saved by method={state['method']!r}; this controller runs "
                           f"method={self.method!r}. Call dst_prune.apply with method={state['method']!r}.")
        names = [t.name for t in self.targets]
        if state.get("targets") != names:
            saved = state.get("targets") if isinstance(state.get("targets"), list) else []
            differ = sorted(set(saved) ^ set(names))[:5] or ["(same names, other order)"]
            raise DSTError(f"state was saved for other sparse tensors (differ: {', '.join(differ)}). Apply "
                           f"with the same include/exclude/dense_stem_and_head as the saved run.")
        if state.get("sparsity") != self.context.target_sparsity:
            raise DSTError(f"state was saved by a run at sparsity={state.get('sparsity')}; this controller targets "
                           f"sparsity={self.context.target_sparsity}. Apply with the saved run's sparsity.")
        granularity = self.config.get("granularity", "element")
        if state.get("granularity") != granularity:
            raise DSTError(f"state was saved by a run with granularity={state.get('granularity')!r}; this "
                           f"controller has granularity={granularity!r}. Apply with the saved run's granularity.")

    def _checked_masks(self: DynamicSparsity, state: dict, budget: int) -> list[torch.Tensor] | None:
        """The saved masks, unpacked, after every check; None for the old format (masks in the model)."""
        if state["format"] == _OLD_FORMAT:
            return None
        packed = _packed_list(state, "masks", self.targets)
        if state.get("masks_digest") != masks_digest(packed):
            raise _refuse("has masks whose digest does not match (a flipped or mixed byte)")
        masks, active = [], 0
        for target, values in zip(self.targets, packed):
            mask = unpack_bits(values.to(target.mask.device), target.shape)
            if not target.grouping.is_whole(mask):
                raise DSTError(f"{target.name}: the saved mask is not made of whole {target.grouping.name} groups; "
                               f"it was saved with another granularity.")
            active += int(torch.count_nonzero(target.grouping.group_mask(mask)))
            masks.append(mask)
        if active != budget:
            raise _refuse(f"has masks with {active} active weights (groups) but a budget of {budget}")
        return masks

    def _prepared(self: DynamicSparsity, state: dict) -> dict:
        """Every check of `load_state_dict`; returns the values to set."""
        if not isinstance(state, dict) or state.get("format") not in (STATE_FORMAT, _OLD_FORMAT):
            raise DSTError(f"state is not a DynamicSparsity.state_dict() (format {STATE_FORMAT!r}).")
        self._check_configuration(state)
        seed, step, update_index = (_integer(state, k) for k in ("seed", "step_count", "update_index"))
        budget = _integer(state, "budget", minimum=1)
        if budget > self.context.n_groups:
            raise _refuse(f"has a budget of {budget} for {self.context.n_groups} groups")
        try:
            schedule = UpdateSchedule(**state["schedule"])
        except (KeyError, TypeError) as error:
            raise _refuse(f"has no valid schedule ({error})") from None
        total_steps = state.get("total_steps", self.context.total_steps)
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise _refuse(f"has total_steps={total_steps!r}")
        ever_active = _packed_list(state, "ever_active", self.targets)
        if not isinstance(state.get("history"), list) or not all(isinstance(r, dict) for r in state["history"]):
            raise _refuse("has no history list")
        if not isinstance(state.get("algorithm"), dict):
            raise _refuse("has no algorithm state")
        self.algorithm.check_state(state["algorithm"])
        return {"seed": seed, "step": step, "update_index": update_index, "budget": budget, "schedule": schedule,
                "total_steps": total_steps,
                "ever_active": ever_active, "masks": self._checked_masks(state, budget)}

    def check_state_dict(self: DynamicSparsity, state: dict) -> None:
        """Raise the `DSTError` that `load_state_dict(state)` would raise, without changing anything."""
        self._prepared(state)

    def check_weights(self: DynamicSparsity, model_state: dict, state: dict) -> None:
        """Refuse a model state dict with non-zero weights outside the masks of controller `state` (saved apart).

        The weights of a sparse model are zero wherever its mask is, so a non-zero there means the two
        come from different steps or runs.
        """
        masks = self._prepared(state)["masks"]
        for target, mask in zip(self.targets, masks or []):
            weight = model_state.get(target.name)
            if isinstance(weight, torch.Tensor) and tuple(weight.shape) == tuple(mask.shape) and \
                    bool(weight.detach().to(mask.device)[~mask].any()):
                raise DSTError(f"{target.name}: the model's weights are non-zero outside the saved mask: the model "
                               f"state and the controller state are of different steps or runs.")

    def load_state_dict(self: DynamicSparsity, state: dict) -> None:
        """Restore `state_dict()`: masks, budget, step, schedule, algorithm, history.

        Everything is checked before anything changes; on a `DSTError` the model and the controller are
        exactly as they were. The model's weights are loaded separately (`model.load_state_dict`), in
        either order.
        """
        self._sync_sharding()
        values = self._prepared(state)
        context = self.context
        context.seed, context.step, context.update_index = values["seed"], values["step"], values["update_index"]
        context.budget, context.schedule, context.total_steps = values["budget"], values["schedule"], \
            values["total_steps"]
        self.algorithm.load_state_dict(state["algorithm"])
        if values["masks"] is not None:
            with torch.no_grad():
                for target, mask in zip(self.targets, values["masks"]):
                    target.write_full_mask(mask)
            self._reset_outside_masks()
            if any(t.sharded for t in self.targets):
                self._decision = mask_digest(self.targets, values["masks"])
        for mine, saved in zip(self.ever_active, values["ever_active"]):
            mine.copy_(saved)
        self.history = list(state["history"])
        self._arm_dense_gradients(context.step + 1)
        self.sync_copies()


class MaskCountCheck(DSTHook):
    """Load pre-hook of the root model: refuse masks (torch prune's form) whose count the controller cannot keep.

    Runs before any tensor is loaded, so a refused state dict leaves the model as it was. For a method
    with a constant budget the count must be exactly the budget; a gradual method's count is checked at
    its next update (its controller state may come after the model's).
    """

    def __init__(self, controller: DynamicSparsity) -> None:
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
