"""`load_sparse_state_dict`: a sparse checkpoint into a freshly built model, without the original `apply` arguments.

The masks come from torch prune's form in the state dict itself (`<name>_orig` + `<name>_mask`), or from
`masks=`: a controller's `state_dict()`, a `{name: bool mask}` mapping, or `"nonzero"` (the non-zero
weights of a plain state dict). Everything is checked against the model first (names, shapes, groups);
a refusal leaves the model untouched. Keys a `save_pretrained` left out because their tensor is tied
to another key (an LM head tied to the embedding) are taken from that key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from ._attach import attach_all, build_algorithm, check_model
from ._bits import packed_length, unpack_bits
from ._optimizer_state import require_optimizer
from .config import SparsityConfig
from .controller import DynamicSparsity
from .controller._state import masks_digest
from .errors import DSTError
from .groups import groupings_for
from .targets import find_targets

__all__ = ["complete_state_dict", "load_sparse_state_dict"]

MaskSource = Mapping[str, torch.Tensor] | dict | str | None


def _pairs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{name: mask}` of torch prune's `<name>_orig` / `<name>_mask` pairs."""
    return {k[:-5]: v for k, v in state_dict.items() if k.endswith("_mask") and k[:-5] + "_orig" in state_dict}


def _controller_masks(state: Mapping, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The masks of a controller's `state_dict()`, after checking its names, lengths, bytes, digest and budget."""
    names, packed = state.get("targets"), state.get("masks")
    if not isinstance(names, list) or not isinstance(packed, (list, tuple)) or len(names) != len(packed):
        raise DSTError(f"masks=: the controller state has {len(packed) if isinstance(packed, (list, tuple)) else 'no'} "
                       f"masks for {len(names) if isinstance(names, list) else 'no'} sparse tensors; it is truncated "
                       f"or not a DynamicSparsity.state_dict().")
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise DSTError(f"masks=: the controller state names {unknown[0]}, which is not a parameter of the model. "
                       f"Build the same architecture as the checkpoint's.")
    for name, values in zip(names, packed):
        length = packed_length(math.prod(shapes[name]))
        if not isinstance(values, torch.Tensor) or values.dtype != torch.uint8 or values.dim() != 1 or \
                values.numel() != length:
            raise DSTError(f"masks=: the controller state's mask of {name} is not its {length} packed bytes; the "
                           f"state is truncated or corrupted.")
    if state.get("masks_digest") != masks_digest(packed):
        raise DSTError("masks=: the controller state's masks do not match their digest (a flipped or mixed byte); "
                       "the state is corrupted. Load another copy of it.")
    masks = {n: unpack_bits(p, shapes[n]) for n, p in zip(names, packed)}
    budget = state.get("budget")
    active = sum(int(m.sum()) for m in masks.values())
    if isinstance(budget, int) and state.get("granularity", "element") == "element" and active != budget:
        raise DSTError(f"masks=: the controller state's masks hold {active} active weights but its budget is "
                       f"{budget}; the state is corrupted.")
    return masks


def _nonzero_masks(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`masks="nonzero"`: the zeros of the weights dst_prune would make sparse (never biases, norms, embeddings)."""
    candidates = {s.name for s in find_targets(model, dense_stem_and_head=False)}
    return {k: v != 0 for k, v in state_dict.items()
            if k in candidates and isinstance(v, torch.Tensor) and v.is_floating_point() and bool((v == 0).any())}


def _masks_from(masks: MaskSource, model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                shapes: dict[str, torch.Size]) -> tuple[dict[str, torch.Tensor], bool]:
    """The masks, and whether the weights must be zero outside them (not for torch prune's own pairs)."""
    pairs = _pairs(state_dict)
    if pairs:
        return pairs, False
    if isinstance(masks, Mapping) and "masks" in masks and "targets" in masks:  # a controller's state_dict()
        return _controller_masks(masks, shapes), True
    if isinstance(masks, str) and masks == "nonzero":
        return _nonzero_masks(model, state_dict), True
    if isinstance(masks, Mapping) and masks:
        return dict(masks), True
    raise DSTError("state_dict is plain (no '<name>_orig'/'<name>_mask' pairs), so it does not say which weights are "
                   "masked: pass masks=dst.state_dict() (the controller state saved with it), masks=dst.masks(), or "
                   "masks='nonzero' to take its non-zero weights as the active ones. A dense state_dict loads with "
                   "model.load_state_dict.")


def _plain_keys(state_dict: Mapping[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """The state dict with torch prune's pairs as plain `<name>` entries (masks dropped)."""
    plain = {}
    for key, value in state_dict.items():
        base = key[:-5] if key.endswith(("_orig", "_mask")) else None
        if base in names:
            if key.endswith("_orig"):
                plain[base] = value
        else:
            plain[key] = value
    return plain


def _tied_partners(model: nn.Module) -> dict[str, list[str]]:
    """For every state-dict key of a tied parameter, the other keys of the same tensor."""
    by_tensor: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                by_tensor.setdefault(id(param), []).append(f"{module_name}.{name}" if module_name else name)
    return {k: [o for o in keys if o != k] for keys in by_tensor.values() if len(keys) > 1 for k in keys}


def complete_state_dict(model: nn.Module, plain: Mapping[str, torch.Tensor], source: str = "state_dict") \
        -> dict[str, torch.Tensor]:
    """Check a plain state dict against the model (keys, shapes) and fill the keys left out as tied duplicates.

    Raises:
        DSTError: a key is missing or unexpected, or a tensor has another shape; `source` names the input.
    """
    own = model.state_dict()
    tied = _tied_partners(model)
    filled = dict(plain)
    for key in set(own) - set(plain):
        partner = next((p for p in tied.get(key, []) if p in plain), None)
        if partner is not None:
            filled[key] = plain[partner]
    missing, unexpected = sorted(set(own) - set(filled)), sorted(set(filled) - set(own))
    if missing or unexpected:
        raise DSTError(f"{source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                       f"Build the same architecture as the checkpoint's.")
    for key, value in filled.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise DSTError(f"{key}: the tensor in {source} has shape {tuple(value.shape)}, the model's "
                           f"{tuple(own[key].shape)}. Build the model with the checkpoint's arguments.")
    return filled


def load_sparse_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, masks: MaskSource = None,
                           method: str = "dsr", granularity: str = "element", optimizer: object = None,
                           update_every: int = 100, total_steps: int | None = None, stop_step: int | None = None,
                           seed: int = 0, **hyperparameters: object) -> DynamicSparsity:
    """Load a sparse checkpoint into a fresh (dense) model without knowing how it was made sparse.

    Args:
        model: a freshly built model of the checkpoint's architecture (not sparse yet).
        state_dict: the model's weights: plain (`model.state_dict()` of a sparse model) or torch prune's form.
        masks: where the masks are when `state_dict` is plain: the controller's `state_dict()`, a
            `{name: bool}` mapping, or `"nonzero"` (every non-zero weight active; a weight regrown at zero and
            not trained since becomes inactive).
        method, granularity, optimizer, update_every, total_steps, stop_step, seed, hyperparameters: as in
            `dst_prune.apply`, for the controller returned.

    Returns:
        A controller keeping exactly the checkpoint's number of active weights.

    Raises:
        DSTError: no masks, or anything that does not fit the model; the model is left untouched.
    """
    model = check_model(model)
    config = SparsityConfig(sparsity=0.0, granularity=granularity, update_every=update_every, total_steps=total_steps,
                            stop_step=stop_step, seed=seed, hyperparameters=hyperparameters, loaded=True)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    found, weights_fit_masks = _masks_from(masks, model, state_dict, shapes)
    for name, mask in found.items():
        if name not in shapes:
            raise DSTError(f"{name}: the checkpoint has a mask for it, but the model has no such parameter. Build the "
                           f"same architecture as the checkpoint's.")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shapes[name]):
            raise DSTError(f"{name}: the checkpoint's mask has shape {tuple(getattr(mask, 'shape', ()))}, the model's "
                           f"parameter {tuple(shapes[name])}.")
        weight = state_dict.get(name)
        if weights_fit_masks and isinstance(weight, torch.Tensor) and weight.shape == mask.shape and \
                bool(weight.detach().masked_select(~mask.to(device=weight.device, dtype=torch.bool)).any()):
            raise DSTError(f"{name}: the state dict's weights are non-zero outside the mask given for it: the weights "
                           f"and the masks are of different steps or runs. Pass the masks saved with these weights.")
    plain = complete_state_dict(model, _plain_keys(state_dict, set(found)))
    algorithm = build_algorithm(method, hyperparameters, config)
    specs = find_targets(model, include="|".join(map(re.escape, found)), dense_stem_and_head=False)
    params = [model.get_submodule(s.module_name)._parameters[s.tensor_name] for s in specs]
    bools = [torch.empty_like(p, dtype=torch.bool).copy_(found[s.name]) for p, s in zip(params, specs)]
    require_optimizer(optimizer)
    active, total = sum(int(m.sum()) for m in bools), sum(m.numel() for m in bools)
    if not active:
        raise DSTError("the checkpoint's masks have no active weight at all; they are not the masks of a trained "
                       "sparse model. Pass the masks saved with it.")
    groupings = groupings_for(granularity, [s.name for s in specs], [p.shape for p in params],
                              sparsity=1 - active / total, distribution="uniform", gradual=algorithm.gradual,
                              layouts=[s.layout for s in specs])
    for spec, mask, grouping in zip(specs, bools, groupings):
        if not grouping.is_whole(mask):
            raise DSTError(f"{spec.name}: the checkpoint's mask is not made of whole {grouping.name} groups. Pass the "
                           f"granularity it was trained with.")
    config = replace(config, sparsity=1 - active / total, method=algorithm.name)
    controller = attach_all(model, specs, bools, groupings, algorithm, config, optimizer)
    model.load_state_dict(plain)  # plain `weight` keys: the masks just attached stay
    return controller
