"""The files of a sharded checkpoint: atomic publish, the `latest` pointer, the SHA-256 manifest.

A checkpoint root folder holds:

    latest                  the name of the current checkpoint folder (replaced atomically)
    step-0000300/           one checkpoint: DCP's shard files and .metadata, dst_state.pt, extra.json,
                            manifest.json (written last: the SHA-256 and size of every other file)
    .partial-step-*/        a save in progress (or killed): never read, removed by the next save

A save writes every file into a new `.partial-*` folder, syncs it to disk, renames it to a name that is not
taken, and only then replaces `latest` (write a temporary file, sync, `os.replace`): at every moment `latest`
names a complete checkpoint. Old checkpoints are removed only after `latest` moved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from ..errors import DSTError

__all__ = ["FORMAT", "MANIFEST", "METADATA", "POINTER", "checkpoint_folder", "find_checkpoint", "hash_files",
           "new_partial", "publish", "read_manifest", "remove_old", "verified_bytes", "verify_file"]

logger = logging.getLogger(__name__)

POINTER = "latest"
MANIFEST = "manifest.json"
METADATA = ".metadata"
FORMAT = "dst_prune.distributed.checkpoint/1"
PARTIAL = ".partial-"
_CHECKPOINT_NAME = re.compile(r"step-\d{7,}(\.\d+)?")


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` through a synced temporary file in the same folder, renamed over it."""
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(data)
    fsync(temporary)
    os.replace(temporary, path)
    fsync(path.parent)


def _digest(path: Path) -> dict:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
            size += len(block)
        os.fsync(stream.fileno())
    return {"sha256": digest.hexdigest(), "bytes": size}


def hash_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """SHA-256 and size of each file (each synced to disk on the way)."""
    return {name: _digest(folder / name) for name in sorted(names)}


def new_partial(root: Path, step: int) -> Path:
    """Create the hidden folder a save writes into (rank 0 only; the others get its name)."""
    if (root / MANIFEST).is_file():
        raise DSTError(f"{root} is a checkpoint folder itself; save into the folder that holds it "
                       f"({root.parent}): every save adds a step-* folder there and moves its '{POINTER}' pointer.")
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f"{PARTIAL}step-{step:07d}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    return partial


def publish(root: Path, partial: Path, manifest: dict) -> Path:
    """Write the manifest into `partial`, rename it into place under a free name, then move `latest` to it."""
    write_atomically(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
    final, revision = root / f"step-{manifest['step']:07d}", 1
    while final.exists():  # never replace a folder: `latest` may name it
        final, revision = root / f"step-{manifest['step']:07d}.{revision}", revision + 1
    os.replace(partial, final)
    fsync(root)
    write_atomically(root / POINTER, final.name.encode())
    return final


def remove_old(root: Path, keep: int | None, current: Path) -> None:
    """After `latest` moved: remove killed saves and all but the newest `keep` checkpoints (never `current`)."""
    for partial in root.glob(PARTIAL + "*"):
        if partial.is_dir():
            logger.info("removing %s, a save that never completed", partial)
            shutil.rmtree(partial, ignore_errors=True)
    if keep is None:
        return
    folders = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    folders.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
    for old in folders[:-keep]:
        if old != current:
            logger.info("removing %s (keep=%d newest checkpoints)", old, keep)
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint folder that `path` names, or None if it holds none.

    `path` is the folder given to `save` (its `latest` pointer is followed), a checkpoint folder itself
    (it has a manifest), or a folder written by an earlier version (DCP's `.metadata`, no manifest).
    """
    path = Path(path)
    pointer = path / POINTER
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise DSTError(f"{pointer} cannot be read ({error}); pass one of the step-* folders in {path} to load.") \
                from None
        folder = path / name
        if not _CHECKPOINT_NAME.fullmatch(name) or not folder.is_dir():
            raise DSTError(f"{pointer} names {name!r}, which is not a checkpoint folder in {path} (changed or removed "
                           f"by hand?). Pass one of its step-* folders to load, or restore the folder.")
        return folder
    if (path / MANIFEST).is_file() or (path / METADATA).is_file():
        return path
    return None


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """`find_checkpoint(path)`, or a `DSTError` saying what `path` should be."""
    folder = find_checkpoint(path)
    if folder is None:
        raise DSTError(f"{path} holds no checkpoint: expected the folder given to distributed_checkpoint.save (with "
                       f"its '{POINTER}' pointer) or one of its step-* folders.")
    return folder


def read_manifest(folder: Path) -> dict | None:
    """The checked manifest (every listed file present with its size); None for a folder without one."""
    file = folder / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise DSTError(f"{file} cannot be read ({error}): the checkpoint is damaged; load another one.") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or not isinstance(manifest.get("step"), int) \
            or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                       for v in files.values()):
        raise DSTError(f"{file} is not a {FORMAT} manifest; the checkpoint is damaged or not one of "
                       f"distributed_checkpoint.save's.")
    for name, entry in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise DSTError(f"{path} is missing or has another size than its manifest says ({entry['bytes']} bytes): "
                           f"the checkpoint is incomplete or damaged; load another one.")
    return manifest


def _refuse_listed(folder: Path, manifest: dict, name: str) -> None:
    if name not in manifest["files"]:
        raise DSTError(f"{folder / name} is not listed in {folder / MANIFEST}: it was not written by this checkpoint's "
                       f"save; the checkpoint is refused.")


def _mismatch(path: Path) -> DSTError:
    return DSTError(f"{path} differs from its SHA-256 in the checkpoint's manifest (a changed, corrupted or "
                    f"swapped file); nothing was loaded. Load another checkpoint.")


def verified_bytes(folder: Path, manifest: dict | None, name: str) -> bytes:
    """The bytes of `folder/name`, after checking them against the manifest (when there is one)."""
    path = folder / name
    if manifest is not None:
        _refuse_listed(folder, manifest, name)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DSTError(f"{path} cannot be read ({error.strerror}): the checkpoint is incomplete.") from None
    if manifest is not None and hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
        raise _mismatch(path)
    return data


def verify_file(folder: Path, manifest: dict, name: str) -> None:
    """Check `folder/name` against its SHA-256 in the manifest, reading it in blocks."""
    _refuse_listed(folder, manifest, name)
    digest = hashlib.sha256()
    with (folder / name).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != manifest["files"][name]["sha256"]:
        raise _mismatch(folder / name)
