"""Staging a sharded checkpoint's load, and the checks run on it before anything reaches the live model.

`load` reads model and optimizer state into tensors of the live ones' kind and sharding (`empty_like`: one more
copy of this rank's shards) and checks them: the model's keys and shapes against the checkpoint's metadata,
then the staged weights against the saved masks, this rank's shard of each (one full layer's mask unpacked at a
time, 1 byte per weight).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._bits import packed_length, unpack_bits
from ..controller._state import masks_digest
from ..errors import DSTError
from .fsdp import ShardLayout, is_dtensor, local_tensor

__all__ = ["check_against_masks", "check_architecture", "empty_like"]

_REBUILD = ("build the checkpoint's architecture (the same model class and configuration, and the same "
            "dst_prune.apply arguments for a sparse model) before loading")


def check_architecture(model_state: dict, metadata: object, folder: Path) -> None:
    """Every key and shape of the model's state dict against the checkpoint's model entries, both ways."""
    saved = {k[len("model."):]: v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}

    def held(key: str) -> bool:  # a non-tensor entry is flattened by DCP into `key.<inner>` entries
        return key in saved or any(k.startswith(key + ".") for k in saved)

    for key, value in model_state.items():
        if not held(key):
            raise DSTError(f"{folder}: the model has {key}, which the checkpoint does not hold; {_REBUILD}.")
        size = getattr(saved.get(key), "size", None)
        if isinstance(value, torch.Tensor) and size is not None and tuple(size) != tuple(value.shape):
            raise DSTError(f"{folder}: {key} has shape {tuple(size)} in the checkpoint but {tuple(value.shape)} in "
                           f"the model; {_REBUILD}.")
    unknown = sorted(k for k in saved if k not in model_state and not any(
        k.startswith(m + ".") for m in model_state if not isinstance(model_state[m], torch.Tensor)))
    if unknown:
        raise DSTError(f"{folder}: the checkpoint holds {unknown[0]} (and {len(unknown) - 1} more entries), which the "
                       f"model does not have; {_REBUILD}.")


def empty_like(value: object) -> object:
    """A copy of a (nested) state dict with every tensor replaced by an uninitialized one of its kind and sharding."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value)
    if isinstance(value, dict):
        return {k: empty_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(empty_like(v) for v in value)
    return value


def check_against_masks(model_state: dict, controller: dict, file: Path) -> None:
    """Refuse weights that are non-zero outside the masks of `controller` (read from `file`), shard by shard.

    The weights of a sparse model are zero wherever its mask is, so a non-zero there means that the model's
    files and the controller's are of different steps or runs (masking rule 9 (docs/design.md): the masks travel apart).
    """
    packed, names = controller.get("masks"), controller.get("targets")
    if packed is None:  # a controller state of the older format keeps its masks in the model: nothing to compare
        return
    folder = file.parent
    if not isinstance(names, list) or not isinstance(packed, list) or len(names) != len(packed) or \
            not all(isinstance(p, torch.Tensor) and p.dtype == torch.uint8 for p in packed) or \
            controller.get("masks_digest") != masks_digest(packed):
        raise DSTError(f"{file} holds no valid masks (a list of bit-packed tensors with their digest).")
    for name, values in zip(names, packed):
        weight = model_state.get(name)
        if not isinstance(weight, torch.Tensor) or values.numel() != packed_length(weight.numel()):
            raise DSTError(f"{file} has a mask for {name}, which the checkpoint's model does not hold with that "
                           f"shape: the files are of different runs.")
        full = unpack_bits(values, weight.shape)
        mask = ShardLayout.of(weight).local_part(full) if is_dtensor(weight) else full
        local = local_tensor(weight).detach()
        if bool(local[~mask.to(local.device)].any()):
            raise DSTError(f"{name}: its weights in {folder} are non-zero outside the mask saved in {file.name}: "
                           f"the model and the controller state are of different steps or runs. Nothing was loaded; "
                           f"load another checkpoint.")
