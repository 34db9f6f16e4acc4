"""Checkpoints of sharded (FSDP2) runs through `torch.distributed.checkpoint` (DCP), the controller included.

    dst_prune.distributed.checkpoint.save(path, model, optimizer, dst)     # on every rank
    dst_prune.distributed.checkpoint.load(path, model, optimizer, dst)     # a fresh apply + fully_shard + optimizer
    dst_prune.distributed.checkpoint.load_unsharded(path, model)          # one process, for inference

The model and the optimizer go through DCP's `get_state_dict`/`set_state_dict`, so each rank writes and
reads its own shards (and DCP can reshard). The model's state dict is plain (DESIGN.md rule 9: `weight`
with zeros in place, no masks). The controller's state (`dst.state_dict()`: full masks bit-packed, 1 bit
per weight, the same on every rank) is written once, by rank 0, as `dst_state.pt` beside DCP's files.

Loading never unpickles an object: DCP's own reader unpickles its `.metadata` file and loads every
non-tensor entry (the optimizer's hyperparameters) with `torch.load(weights_only=False)`; here the
metadata is read by an unpickler that admits only DCP's metadata classes, every entry and `dst_state.pt`
with `weights_only=True`, and anything else is a `DSTError` naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import DSTError

__all__ = ["CONTROLLER_FILE", "controller_state", "load", "load_unsharded", "save"]

CONTROLLER_FILE = "dst_state.pt"

# what DCP's `.metadata` pickle may name: its dataclasses, tensor sizes, dtypes and layouts, and paths
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's metadata: only the classes it is made of, nothing that could run code."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if name in _METADATA_CLASSES.get(module, ()) or is_dtype:
            return super().find_class(module, name)
        raise DSTError(f"{self.path} names {module}.{name}, which is not part of a checkpoint's metadata; the "
                       f"checkpoint is refused (loading it could run code).")


def _safe_reader(path: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: object, **kwargs: object):
            rank = kwargs.get("rank")
            file = Path(path, ".metadata" if rank is None else f"__{rank}.metadata")
            if not file.is_file():
                file = Path(path, ".metadata")
            try:
                with open(file, "rb") as stream:
                    metadata = _MetadataUnpickler(stream, file).load()
            except DSTError:
                raise
            except Exception as error:
                raise DSTError(f"{file} cannot be read as a checkpoint's metadata ({type(error).__name__}: "
                               f"{str(error)[:200]}).") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    reader = SafeReader(path)
    reader.read_metadata()  # refused here, with its DSTError, rather than wrapped in DCP's exception per rank
    return reader


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        """DCP's planner, reading every non-tensor entry with `weights_only=True`."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as error:
                raise DSTError(f"the checkpoint's entry {read_item.dest_index.fqn} is not tensors and plain values "
                               f"({type(error).__name__}); it is refused.") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyPlanner()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


def save(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, dst: object) -> None:
    """Save model, optimizer and controller to the DCP folder `path` (a collective: call it on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    controller = dst.state_dict()  # on every rank: it may gather sharded masks
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path),
             no_dist=not _distributed())
    if _rank() == 0:
        partial = Path(path, CONTROLLER_FILE + ".partial")
        torch.save(controller, partial)
        os.replace(partial, Path(path, CONTROLLER_FILE))
    _barrier()


def controller_state(path: str | os.PathLike) -> dict:
    """The controller state saved in the checkpoint folder `path` (read with `weights_only=True`)."""
    file = Path(path, CONTROLLER_FILE)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DSTError(f"{file} cannot be read as tensors and plain values ({type(error).__name__}: "
                       f"{str(error)[:200]}); the checkpoint is incomplete or not one of dst_prune's.") from None


def load(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, dst: object) -> None:
    """Load what `save` wrote into a model sharded the same way (a collective: call it on every rank).

    Build the model as for the saved run (`dst_prune.apply`, `fully_shard`, the optimizer handed over
    with `dst.optimizer = optimizer`), then call this before training. The controller's state is checked
    before anything is loaded.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    controller = controller_state(path)
    dst.check_state_dict(controller)  # refuse before anything changes
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, storage_reader=_safe_reader(str(path)), planner=_safe_planner(), no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    dst.load_state_dict(controller)


def load_unsharded(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model weights of a sharded checkpoint, read on one process into the plain state dict of `model`.

    `model` is a freshly built (untouched) model of the checkpoint's architecture; its weights are filled
    in place, and the returned state dict loads with `strict=True` anywhere. To make it sparse again, with
    the checkpoint's masks: `dst_prune.load_sparse_state_dict(model, state, masks=controller_state(path))`.
    """
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=_safe_reader(str(path)), planner=_safe_planner(), no_dist=True)
    return state["model"]
