"""Checkpoints of sharded (FSDP2) runs through `torch.distributed.checkpoint` (DCP), the controller included.

    dst_prune.distributed_checkpoint.save(path, model, optimizer, dst)     # on every rank
    dst_prune.distributed_checkpoint.load(path, model, optimizer, dst)     # a fresh apply + fully_shard + optimizer

The model and the optimizer go through DCP's `get_state_dict`/`set_state_dict`, so each rank writes and
reads its own shards (and DCP can reshard). The model's state dict is plain (DESIGN.md rule 9: `weight`
with zeros in place, no masks). The controller's state (`dst.state_dict()`: full masks bit-packed, 1 bit
per weight, the same on every rank) travels as one `torch.save` blob of tensors and plain values that
`torch.load(weights_only=True)` reads; DCP stores it once. A resumed run is bitwise equal to the
uninterrupted one (tests/test_fsdp.py).

For inference on one process, `torch.distributed.checkpoint.format_utils.dcp_to_torch_save(path, "full.pt")`
makes a plain file: `plain_model.load_state_dict(full["model"])` loads into an untouched model, and
`controller_state(full["dst"])` into the controller of an unsharded sparse one.
"""

from __future__ import annotations

import io

import torch
from torch import nn

__all__ = ["controller_state", "load", "save"]

_KEY = "dst_prune"


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, dst: object) -> None:
    """Save model, optimizer and controller to the DCP folder `path` (a collective: call it on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    blob = io.BytesIO()
    torch.save(dst.state_dict(), blob)
    blob.seek(0)
    dcp.save({"model": model_state, "optimizer": optimizer_state, _KEY: blob}, checkpoint_id=path)


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, dst: object) -> None:
    """Load what `save` wrote into a model sharded the same way (a collective: call it on every rank).

    Build the model as for the saved run (`dst_prune.apply`, `fully_shard`, the optimizer handed over
    with `dst.optimizer = optimizer`), then call this before training.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, _KEY: io.BytesIO()}
    dcp.load(state, checkpoint_id=path)
    controller = controller_state(state[_KEY])
    dst.check_state_dict(controller)  # refuse before anything changes
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    dst.load_state_dict(controller)


def controller_state(blob: io.BytesIO | bytes) -> dict:
    """The controller state in a saved blob (tensors and plain values only: read with `weights_only=True`)."""
    data = blob.getvalue() if isinstance(blob, io.BytesIO) else bytes(blob)
    return torch.load(io.BytesIO(data), weights_only=True)
