"""Reading DCP's files without unpickling objects, each file checked against the manifest before it is used.

DCP's own reader unpickles its `.metadata` and loads every non-tensor entry (the optimizer's hyperparameters)
with `torch.load(weights_only=False)`. Here the metadata is read by an unpickler that admits only DCP's
metadata classes, every entry with `weights_only=True`, and each shard file a rank reads is first checked
against its SHA-256 in the manifest (by that rank: a rank verifies the files it reads, nothing else).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import torch
from torch.futures import Future

from .._torch import set_nested_element
from ..errors import DSTError
from ._dcp_files import METADATA, verified_bytes, verify_file

__all__ = ["read_metadata", "verifying_reader", "weights_only_planner"]

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

    def __init__(self, file: io.BytesIO, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if name in _METADATA_CLASSES.get(module, ()) or is_dtype:
            return super().find_class(module, name)
        raise DSTError(f"{self.path} names {module}.{name}, which is not part of a checkpoint's metadata; the "
                       f"checkpoint is refused (loading it could run code).")


def read_metadata(folder: Path, manifest: dict | None) -> object:
    """DCP's `Metadata` of the checkpoint in `folder`, verified against the manifest, read by the allowlist."""
    file = folder / METADATA
    data = verified_bytes(folder, manifest, METADATA)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), file).load()
    except DSTError:
        raise
    except Exception as error:
        raise DSTError(f"{file} cannot be read as a checkpoint's metadata ({type(error).__name__}: "
                       f"{str(error)[:200]}).") from None
    if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise DSTError(f"{file} is not DCP metadata; the checkpoint is refused.")
    return metadata


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class VerifyingReader(FileSystemReader):
        """DCP's file reader, given the checked metadata; verifies each shard file it is about to read."""

        def __init__(self, folder: Path, manifest: dict | None, metadata: object) -> None:
            super().__init__(str(folder))
            self.folder, self.manifest, self.metadata = folder, manifest, metadata

        def read_metadata(self, *args: object, **kwargs: object) -> object:
            if getattr(self.metadata, "storage_meta", None) is None:
                self.metadata.storage_meta = StorageMeta()
            self.metadata.storage_meta.load_id = self.load_id
            return self.metadata

        def read_data(self, plan, planner):
            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(str(self.storage_data[item.storage_index].relative_path), []).append(item)
            if self.manifest is not None:  # every file this rank reads, before any is read
                for name in sorted(per_file):
                    verify_file(self.folder, self.manifest, name)
            for name, items in per_file.items():  # one file at a time, so that a failure names its file
                try:
                    super().read_data(dataclasses.replace(plan, items=items), planner).wait()
                except DSTError:
                    raise
                except Exception as error:
                    raise DSTError(f"{self.folder / name} cannot be read ({type(error).__name__}: "
                                   f"{str(error).strip()[:200]}): the checkpoint is damaged.") from None
            future = Future()
            future.set_result(None)
            return future

    return VerifyingReader


def verifying_reader(folder: Path, manifest: dict | None, metadata: object) -> object:
    """A DCP `FileSystemReader` of `folder` that verifies the shard files it reads (see the module docstring)."""
    return _reader_class()(folder, manifest, metadata)


def weights_only_planner() -> object:
    """DCP's default load planner, reading every non-tensor entry with `weights_only=True`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as error:
                raise DSTError(f"the checkpoint's entry {read_item.dest_index.fqn} is not tensors and plain values "
                               f"({type(error).__name__}); it is refused.") from None
            if self.flatten_state_dict:
                set_nested_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyPlanner()
