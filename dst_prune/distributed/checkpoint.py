"""Checkpoints of sharded (FSDP2) runs through `torch.distributed.checkpoint` (DCP), the controller included.

    folder = distributed_checkpoint.save(path, model, optimizer, dst, extra={"epoch": 3})  # on every rank
    extra = distributed_checkpoint.load(path, model, optimizer, dst)   # a fresh apply + fully_shard + optimizer
    state = distributed_checkpoint.load_unsharded(path, model)         # one process, for inference

The model and the optimizer go through DCP's `get_state_dict`/`set_state_dict`, so each rank writes and reads
its own shards (and DCP can reshard). The model's state dict is plain (masking rule 9: `weight` with zeros in
place, no masks). The controller's state (`dst.state_dict()`: full masks bit-packed, the same on every rank) is
written once, by rank 0, as `dst_state.pt`; `extra` (JSON values) as `extra.json`.

Every save is a new folder `path/step-XXXXXXX` published atomically, with a SHA-256 manifest written last, and
`path/latest` names the current one (`dcp_files`). Every load verifies before it writes anything: the manifest
(each rank hashes the files it reads), the controller's state, the model's keys and shapes; it reads model and
optimizer into staging tensors (same sharding: one more copy of this rank's shards), checks the staged weights
against the saved masks, and only then copies them into the live model and optimizer and loads the controller.
Any failure is the same `DSTError` on every rank, and model, optimizer and controller are unchanged.

Nothing is unpickled as objects: DCP's `.metadata` is read by an allowlist unpickler, every entry and
`dst_state.pt` with `weights_only=True` (`dcp_reader`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import DSTError
from . import _dcp_files as dcp_files
from ._dcp_agreement import agreed, gather_json, is_distributed, rank, refusing, world_size
from ._dcp_files import checkpoint_folder, find_checkpoint
from ._dcp_reader import read_metadata, verifying_reader, weights_only_planner
from ._dcp_staging import check_against_masks, check_architecture, empty_like

__all__ = ["CONTROLLER_FILE", "EXTRA_FILE", "controller_state", "extra_state", "find_checkpoint", "load",
           "load_unsharded", "save"]

logger = logging.getLogger(__name__)

CONTROLLER_FILE = "dst_state.pt"
EXTRA_FILE = "extra.json"


def _checked_arguments(extra: object, keep: object) -> str | None:
    """`extra` as JSON text (None when not given), after checking it and `keep`."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise DSTError(f"keep={keep!r}; expected a number of checkpoints >= 1 to keep, or None to keep all.")
    if extra is None:
        return None
    if not isinstance(extra, dict):
        raise DSTError(f"extra is a {type(extra).__name__}; expected a dict of JSON values (e.g. "
                       f"{{'epoch': 3, 'scheduler': scheduler.state_dict()}}).")
    for key, value in extra.items():
        reason = "it reads back as another value: use str keys and lists, not tuples"
        try:
            if json.loads(json.dumps({key: value}, allow_nan=False)) == {key: value}:
                continue
        except (TypeError, ValueError) as error:
            reason = str(error)
        raise DSTError(f"extra[{key!r}] is not a JSON value ({reason}); expected dicts with str keys, lists, str, "
                       f"finite numbers, bools and None (convert tensors with .tolist()).")
    return json.dumps(extra, allow_nan=False)


def _publish(root: Path, partial: Path, step: int, shard_hashes: dict, controller: dict, extra: str | None,
             keep: int | None) -> str:
    """Rank 0: write the controller (and extra), the manifest last, publish, move `latest`, remove old ones."""
    torch.save(controller, partial / CONTROLLER_FILE)
    if extra is not None:
        (partial / EXTRA_FILE).write_text(extra)
    files = dict(shard_hashes)
    files.update(dcp_files.hash_files(partial, [p.name for p in partial.iterdir() if p.name not in files]))
    manifest = {"format": dcp_files.FORMAT, "step": step, "world_size": world_size(), "files": files}
    final = dcp_files.publish(root, partial, manifest)
    try:
        dcp_files.remove_old(root, keep, final)
    except OSError as error:  # the checkpoint is published; only the clean-up failed
        logger.warning("could not remove old checkpoints in %s: %s", root, error)
    return final.name


def save(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, dst: object, *,
         extra: dict | None = None, keep: int | None = 2) -> Path:
    """Save model, optimizer, controller and `extra` as a new checkpoint in `path` (a collective: every rank).

    Args:
        path: the checkpoint root; the checkpoint becomes `path/step-XXXXXXX` (the controller's step) and
            `path/latest` is moved to it once every file is on disk.
        extra: JSON values saved with it (training position, LR scheduler state, ...); `load` returns them.
        keep: how many checkpoints to keep in `path` (the newest; removed only after `latest` moved); None: all.

    Returns:
        The checkpoint folder.

    Raises:
        DSTError: on every rank, if a rank failed; `latest` and the checkpoints in `path` are unchanged.
    """
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root, what = Path(path), f"saving a checkpoint to {path}"
    extra_text = agreed(lambda: _checked_arguments(extra, keep), what)
    had_state = bool(optimizer.state)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if not had_state:  # get_state_dict fills an empty optimizer state with a zero-gradient step: not ours to keep
        optimizer.state.clear()
    controller = dst.state_dict()  # on every rank: it gathers sharded masks
    step = controller["step_count"]
    name = agreed(lambda: dcp_files.new_partial(root, step).name if rank() == 0 else None, what)
    partial = root / gather_json(name)[0]
    try:
        agreed(lambda: dcp_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(partial),
                                no_dist=not is_distributed()), what)
        own = agreed(lambda: dcp_files.hash_files(partial, [p.name for p in partial.iterdir()
                                                            if p.name.startswith(f"__{rank()}_")]), what)
        shard_hashes = {file: entry for hashes in gather_json(own) for file, entry in hashes.items()}
        final = agreed(lambda: _publish(root, partial, step, shard_hashes, controller, extra_text, keep)
                       if rank() == 0 else None, what)
    except DSTError:
        if rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return root / gather_json(final)[0]


def _manifest(folder: Path) -> dict | None:
    manifest = dcp_files.read_manifest(folder)
    if manifest is None and rank() == 0:
        logger.warning("%s has no %s: it was written by an earlier dst_prune, whose save was not atomic and kept no "
                       "checksums. It is loaded unverified (its weights are still checked against its masks); save "
                       "it again to get a verified checkpoint.", folder, dcp_files.MANIFEST)
    return manifest


def _read_controller(folder: Path, manifest: dict | None) -> dict:
    data = dcp_files.verified_bytes(folder, manifest, CONTROLLER_FILE)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise DSTError(f"{folder / CONTROLLER_FILE} cannot be read as tensors and plain values ({type(error).__name__}"
                       f": {str(error)[:200]}); the checkpoint is incomplete or not one of dst_prune's.") from None
    if not isinstance(state, dict):
        raise DSTError(f"{folder / CONTROLLER_FILE} holds a {type(state).__name__}, not a controller state dict.")
    return state


def controller_state(path: str | os.PathLike) -> dict:
    """The controller state of the checkpoint `path` names (verified, read with `weights_only=True`)."""
    folder = checkpoint_folder(path)
    return _read_controller(folder, _manifest(folder))


def _read_extra(folder: Path, manifest: dict | None) -> dict:
    if manifest is None or EXTRA_FILE not in manifest["files"]:
        return {}
    try:
        extra = json.loads(dcp_files.verified_bytes(folder, manifest, EXTRA_FILE))
    except ValueError as error:
        raise DSTError(f"{folder / EXTRA_FILE} is not valid JSON ({error}).") from None
    if not isinstance(extra, dict):
        raise DSTError(f"{folder / EXTRA_FILE} holds a {type(extra).__name__}, not a dict.")
    return extra


def extra_state(path: str | os.PathLike) -> dict:
    """The `extra` dict of the checkpoint `path` names (verified against its manifest), loading nothing.

    What `load` would return, read before it: to check the caller's own state first (`{}` when none was saved).
    """
    folder = checkpoint_folder(path)
    return _read_extra(folder, _manifest(folder))


def _read_checked(folder: Path, dst: object) -> tuple:
    """Manifest, metadata, controller state and extra of `folder`, each verified and checked against `dst`."""
    manifest = _manifest(folder)
    metadata = read_metadata(folder, manifest)
    controller = _read_controller(folder, manifest)
    if manifest is not None and manifest["step"] != controller.get("step_count"):
        raise DSTError(f"{folder / CONTROLLER_FILE} is at step {controller.get('step_count')!r}, its manifest at "
                       f"step {manifest['step']}: the files are of different saves.")
    try:
        dst.check_state_dict(controller)
    except DSTError as error:
        raise DSTError(f"{folder / CONTROLLER_FILE}: {error}") from None
    return manifest, metadata, controller, _read_extra(folder, manifest)


def load(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, dst: object) -> dict:
    """Load a checkpoint of `save` into a model sharded the same way (a collective: call it on every rank).

    Build the model as for the saved run (`dst_prune.apply`, `fully_shard`, the optimizer handed over with
    `dst.optimizer = optimizer`), then call this before training.

    Args:
        path: the folder given to `save` (its `latest` checkpoint is loaded) or a checkpoint folder in it.

    Returns:
        The `extra` dict saved with the checkpoint (empty when none was).

    Raises:
        DSTError: on every rank, naming the file or tensor refused; model, optimizer and controller unchanged.
    """
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    what = f"loading the checkpoint {path}"
    folder = Path(gather_json(agreed(lambda: str(checkpoint_folder(path)) if rank() == 0 else None, what))[0])
    what = f"loading the checkpoint {folder}"
    manifest, metadata, controller, extra = agreed(lambda: _read_checked(folder, dst), what)
    optimizer_state_before, loaded = dict(optimizer.state), False

    def staging() -> dict:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        check_architecture(model_state, metadata, folder)
        return {"model": empty_like(model_state), "optimizer": empty_like(optimizer_state)}

    try:
        staged = agreed(staging, what)
        agreed(lambda: dcp_load(staged, storage_reader=verifying_reader(folder, manifest, metadata),
                                planner=weights_only_planner(), no_dist=not is_distributed()), what)
        agreed(lambda: check_against_masks(staged["model"], controller, folder / CONTROLLER_FILE), what)
        set_state_dict(model, optimizer, model_state_dict=staged["model"], optim_state_dict=staged["optimizer"])
        dst.load_state_dict(controller)
        loaded = True
    finally:
        if not loaded:  # get_state_dict may have filled an empty optimizer state
            optimizer.state.clear()
            optimizer.state.update(optimizer_state_before)
    return extra


def load_unsharded(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model weights of a sharded checkpoint, read on one process into the plain state dict of `model`.

    `model` is a freshly built (untouched) model of the checkpoint's architecture; its weights are filled
    in place, and the returned state dict loads with `strict=True` anywhere. To make it sparse again, with
    the checkpoint's masks: `dst_prune.load_sparse_state_dict(model, state, masks=controller_state(path))`.

    Raises:
        DSTError: naming the key when `model` is of another architecture (a key missing, extra or of another
            shape), or the file refused; `model` is unchanged.
    """
    from torch.distributed.checkpoint import load as dcp_load

    folder = checkpoint_folder(path)

    def read() -> dict:
        manifest = _manifest(folder)
        metadata = read_metadata(folder, manifest)
        live = model.state_dict()
        check_architecture(live, metadata, folder)
        staged = {"model": empty_like(live)}
        dcp_load(staged, storage_reader=verifying_reader(folder, manifest, metadata), planner=weights_only_planner(),
                 no_dist=True)
        check_against_masks(staged["model"], _read_controller(folder, manifest), folder / CONTROLLER_FILE)
        return staged["model"]

    model.load_state_dict(refusing(read, f"loading the checkpoint {folder} into one process"), strict=True)
    return model.state_dict()
