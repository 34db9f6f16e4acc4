"""`dst_prune.distributed.checkpoint` on one process: the round trip, atomic publish, the manifest, weights checked
against the masks, DCP failures as `DSTError`, the unsharded read for inference, and files that would run code
refused unread; then real processes: 2 ranks (FSDP2, gloo) whose saves are killed at chosen points
(tests/workers/dcp_faults.py) and resumed. The sharded training runs are in tests/test_fsdp.py."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import dst_prune
from dst_prune.distributed import checkpoint as distributed_checkpoint


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def mlp(hidden: int = 32, layers: int = 3) -> nn.Module:
    blocks = [nn.Linear(12, hidden), nn.ReLU()]
    for _ in range(layers - 2):
        blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(hidden, 3))


def build(seed: int = 0, optimizer: str = "adamw"):
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if optimizer == "adamw" else \
        torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.8, method="rigl", optimizer=opt, update_every=2, total_steps=20,
                          dense_stem_and_head=False)
    return model, opt, dst


def train(model, optimizer, dst, steps) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 12, generator=g)
        loss = nn.functional.cross_entropy(model(x), x[:, :3].argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dst.step()


def folder_of(root: Path) -> Path:
    """The checkpoint folder `latest` names (the root itself where there is no pointer)."""
    pointer = root / "latest"
    return root / pointer.read_text().strip() if pointer.is_file() else root


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def same(a: object, b: object) -> bool:
    """Deep equality of nested state dicts, tensors compared exactly (values, dtype, shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def everything(model, optimizer, dst) -> tuple:
    """What a refused load must leave unchanged: model (tensors, hooks, attributes), optimizer, controller."""
    return snapshot(model), copy.deepcopy(optimizer.state_dict()), copy.deepcopy(dst.state_dict())


def assert_everything_unchanged(model, optimizer, dst, before: tuple) -> None:
    assert_unchanged(model, before[0])
    assert same(optimizer.state_dict(), before[1]), "optimizer changed"
    assert same(dst.state_dict(), before[2]), "controller changed"


def save_legacy(folder: Path, model, optimizer, dst, controller: bool = True) -> None:
    """What `save` wrote before checkpoints were published atomically: DCP's files and dst_state.pt in one folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder), no_dist=True)
    if controller:
        torch.save(dst.state_dict(), folder / "dst_state.pt")


def rehash(folder: Path, **manifest_changes) -> None:
    """Rewrite the manifest to the files as they are now (a forger's move: hashes alone cannot stop it)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest.update(manifest_changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def flip_tensor_byte(folder: Path, fqn: str) -> str:
    """Flip a byte inside the stored values of entry `fqn` (silent for DCP: it has no checksum). Returns the file."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == fqn)
    path = folder / info.relative_path
    data = bytearray(path.read_bytes())
    record = bytes(data[info.offset:info.offset + info.length])
    import io
    values = torch.load(io.BytesIO(record), weights_only=True).numpy().tobytes()
    position = info.offset + record.index(values) + len(values) // 2
    data[position] ^= 0x40
    path.write_bytes(bytes(data))
    return str(info.relative_path)


@pytest.fixture
def saved(tmp_path):
    model, optimizer, dst = build()
    train(model, optimizer, dst, range(5))
    distributed_checkpoint.save(tmp_path / "ckpt", model, optimizer, dst)
    return tmp_path / "ckpt", model, optimizer, dst


# --- the round trip -------------------------------------------------------------------------------------------
def test_round_trip_resumes_exactly_and_reads_unsharded(tmp_path):
    model, optimizer, dst = build()
    train(model, optimizer, dst, range(5))
    extra = {"epoch": 1, "batch": 7, "scheduler": {"last_epoch": 5, "_last_lr": [0.01]}, "note": None}
    path = tmp_path / "ckpt"
    folder = distributed_checkpoint.save(path, model, optimizer, dst, extra=extra)
    assert folder == path / "step-0000005" and (path / "latest").read_text() == "step-0000005"
    straight = [p.detach().clone() for p in model.parameters()]
    saved_masks = [t.mask.clone() for t in dst.targets]
    train(model, optimizer, dst, range(5, 9))
    for source in (path, folder):  # the root (its `latest`) and the checkpoint folder itself
        resumed_model, resumed_optimizer, resumed = build(seed=7)  # other initial weights: all from the file
        assert distributed_checkpoint.load(source, resumed_model, resumed_optimizer, resumed) == extra
        assert all(torch.equal(a, b.detach()) for a, b in zip(straight, resumed_model.parameters()))
        train(resumed_model, resumed_optimizer, resumed, range(5, 9))
        assert resumed.history == dst.history
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(model.parameters(), resumed_model.parameters()))

    untouched = mlp()
    state = distributed_checkpoint.load_unsharded(path, untouched)  # weights in place, masks not needed
    assert not dst_prune.is_sparse(untouched)
    sparse_again = mlp()
    controller = dst_prune.load_sparse_state_dict(sparse_again, state,
                                                  masks=distributed_checkpoint.controller_state(path))
    assert controller.budget == dst.budget
    assert all(torch.equal(a.mask, b) for a, b in zip(controller.targets, saved_masks))
    x = torch.randn(4, 12)
    assert torch.equal(untouched(x), sparse_again(x))


# --- atomic publish ----------------------------------------------------------------------------------------
def test_each_save_is_a_new_folder_with_a_manifest_and_latest_moves_last(tmp_path):
    model, optimizer, dst = build()
    path = tmp_path / "ckpt"
    folders = []
    for steps in (range(0, 2), range(2, 4), range(4, 4), range(4, 6)):  # step 4 twice: a second folder, not over it
        train(model, optimizer, dst, steps)
        folders.append(distributed_checkpoint.save(path, model, optimizer, dst, keep=2).name)
        assert (path / "latest").read_text() == folders[-1]
    assert folders == ["step-0000002", "step-0000004", "step-0000004.1", "step-0000006"]
    assert sorted(p.name for p in path.iterdir()) == ["latest", "step-0000004.1", "step-0000006"]  # keep=2, no partial
    manifest = json.loads((path / "step-0000006" / "manifest.json").read_text())
    files = sorted(p.name for p in (path / "step-0000006").iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files == [".metadata", "__0_0.distcp", "dst_state.pt"]
    assert manifest["step"] == 6 and manifest["world_size"] == 1
    for name, entry in manifest["files"].items():
        data = (path / "step-0000006" / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    distributed_checkpoint.save(path, model, optimizer, dst, keep=None)  # None keeps every checkpoint
    assert len([p for p in path.iterdir() if p.is_dir()]) == 3


def test_a_failed_save_leaves_the_previous_checkpoint_and_latest_unchanged(saved, monkeypatch):
    path, model, optimizer, dst = saved
    before = files_of(path)
    train(model, optimizer, dst, range(5, 7))
    for extra, error in [((1, 2), "extra is a tuple"), ({"lr": torch.tensor(0.1)}, r"extra\['lr'\] is not a JSON"),
                         ({"steps": (1, 2)}, r"extra\['steps'\]"), ({"loss": float("nan")}, r"extra\['loss'\]")]:
        with pytest.raises(dst_prune.DSTError, match=error):
            distributed_checkpoint.save(path, model, optimizer, dst, extra=extra)
    with pytest.raises(dst_prune.DSTError, match="keep=0"):
        distributed_checkpoint.save(path, model, optimizer, dst, keep=0)
    real_save = torch.save

    def disk_full(obj, file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).name == "dst_state.pt":
            raise OSError(28, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(dst_prune.DSTError, match="No space left on device"):
        distributed_checkpoint.save(path, model, optimizer, dst)
    assert files_of(path) == before  # the partial folder is removed, latest and step-0000005 untouched


# --- verification before anything is loaded ---------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip:model.0.weight", "flip:optimizer.state.2.weight_orig.exp_avg", "dst_state.pt",
                                    "extra.json", "missing:__0_0.distcp", "truncated:__0_0.distcp"])
def test_a_changed_or_missing_file_is_refused_by_name_and_nothing_changes(tmp_path, damage):
    model, optimizer, dst = build()
    train(model, optimizer, dst, range(5))
    kind, _, name = damage.partition(":")
    distributed_checkpoint.save(tmp_path / "ckpt", model, optimizer, dst,
                                **({"extra": {"epoch": 2}} if kind == "extra.json" else {}))
    folder = folder_of(tmp_path / "ckpt")
    if kind == "flip":
        name = flip_tensor_byte(folder, name)
    elif kind == "missing":
        (folder / name).unlink()
    elif kind == "truncated":
        (folder / name).write_bytes((folder / name).read_bytes()[:-10])
    else:
        name = kind
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (folder / name).write_bytes(bytes(data))
    live, files = build(seed=7), files_of(tmp_path)
    before = everything(*live)
    with pytest.raises(dst_prune.DSTError, match=name.replace(".", r"\.")):
        distributed_checkpoint.load(tmp_path / "ckpt", *live)
    assert_everything_unchanged(*live, before)
    assert files_of(tmp_path) == files
    if name != "extra.json":  # (not read by load_unsharded)
        fresh = mlp()
        fresh_before = snapshot(fresh)
        with pytest.raises(dst_prune.DSTError, match=name.replace(".", r"\.")):
            distributed_checkpoint.load_unsharded(tmp_path / "ckpt", fresh)
        assert_unchanged(fresh, fresh_before)


def test_weights_of_another_step_than_the_masks_are_refused_naming_the_tensor(tmp_path):
    """A checkpoint whose dst_state.pt is of an earlier step, with a manifest forged to match: the mask check."""
    model, optimizer, dst = build()
    train(model, optimizer, dst, range(5))
    early = distributed_checkpoint.save(tmp_path / "ckpt", model, optimizer, dst)
    early_masks = [t.mask.clone() for t in dst.targets]
    train(model, optimizer, dst, range(5, 9))
    late = distributed_checkpoint.save(tmp_path / "ckpt", model, optimizer, dst)
    outside = [t.name for t, m in zip(dst.targets, early_masks) if bool(t.orig.detach()[~m].any())]
    assert outside  # the premise: the later weights are non-zero outside the earlier masks
    (late / "dst_state.pt").write_bytes((early / "dst_state.pt").read_bytes())
    rehash(late, step=5)
    live, files = build(seed=7), files_of(tmp_path)
    before = everything(*live)
    with pytest.raises(dst_prune.DSTError, match=rf"{outside[0]}: its weights .* non-zero outside the mask"):
        distributed_checkpoint.load(late, *live)
    assert_everything_unchanged(*live, before)
    assert files_of(tmp_path) == files
    rehash(late, step=9)  # the manifest at its own step: the files are of different saves
    with pytest.raises(dst_prune.DSTError, match=r"dst_state\.pt is at step 5, its manifest at step 9"):
        distributed_checkpoint.load(late, *live)
    assert_everything_unchanged(*live, before)


# --- checkpoints of the earlier format (no manifest) --------------------------------------------------------
def test_a_checkpoint_without_manifest_loads_with_a_warning(tmp_path, caplog):
    model, optimizer, dst = build()
    train(model, optimizer, dst, range(5))
    save_legacy(tmp_path / "old", model, optimizer, dst)
    straight = [p.detach().clone() for p in model.parameters()]
    live = build(seed=7)
    with caplog.at_level(logging.WARNING, logger="dst_prune.distributed.checkpoint"):
        assert distributed_checkpoint.load(tmp_path / "old", *live) == {}
    assert "no manifest.json" in caplog.text and "unverified" in caplog.text
    assert all(torch.equal(a, b.detach()) for a, b in zip(straight, live[0].parameters()))
    assert live[2].step_count == 5 and live[1].state_dict()["state"][0]["step"] == 5


def test_a_save_of_the_earlier_format_killed_between_its_two_writes_is_refused(tmp_path):
    """The earlier format wrote the shards, then dst_state.pt, in place: killed between them, the folder holds the
    new weights and the old masks. Loaded, the old masks would zero the trained weights; it is refused instead."""
    model, optimizer, dst = build()
    train(model, optimizer, dst, range(5))
    save_legacy(tmp_path / "old", model, optimizer, dst)
    train(model, optimizer, dst, range(5, 9))
    save_legacy(tmp_path / "old", model, optimizer, dst, controller=False)  # killed before dst_state.pt
    live, files = build(seed=7), files_of(tmp_path)
    before = everything(*live)
    with pytest.raises(dst_prune.DSTError, match=r"non-zero outside the mask saved in dst_state\.pt"):
        distributed_checkpoint.load(tmp_path / "old", *live)
    assert_everything_unchanged(*live, before)
    assert files_of(tmp_path) == files


# --- DCP's own failures ----------------------------------------------------------------------------------------
def test_a_dcp_read_failure_midway_is_a_dst_error_and_changes_nothing(tmp_path):
    """No manifest to catch it: DCP reads part of the file into the tensors, then fails (a CheckpointException, a
    BaseException). Staging keeps the live model out of it."""
    model, optimizer, dst = build()
    train(model, optimizer, dst, range(5))
    save_legacy(tmp_path / "old", model, optimizer, dst)
    shard = tmp_path / "old" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:int(shard.stat().st_size * 0.8)])
    live = build(seed=7)
    before = everything(*live)
    with pytest.raises(dst_prune.DSTError, match=r"__0_0\.distcp cannot be read"):
        distributed_checkpoint.load(tmp_path / "old", *live)
    assert_everything_unchanged(*live, before)


def test_another_optimizer_is_refused_naming_the_key_and_its_state_is_unchanged(saved):
    live = build(seed=7, optimizer="sgd")  # the checkpoint holds AdamW's state, this run has SGD with momentum
    before = everything(*live)
    assert not live[1].state
    with pytest.raises(dst_prune.DSTError, match=r"Missing key in checkpoint state_dict: optimizer\..*momentum"):
        distributed_checkpoint.load(saved[0], *live)
    assert not live[1].state  # get_state_dict's zero-gradient step filled it; the refusal emptied it again
    assert_everything_unchanged(*live, before)


def without_last_bias() -> nn.Module:
    model = mlp()
    model[4] = nn.Linear(32, 3, bias=False)
    return model


def with_another_layer() -> nn.Module:
    model = mlp()
    model.add_module("9", nn.Linear(3, 3))
    return model


@pytest.mark.parametrize("other, key", [(lambda: mlp(hidden=40), r"0\.weight has shape \(32, 12\) in the checkpoint "
                                                                 r"but \(40, 12\)"),
                                        (with_another_layer, r"the model has 9\.weight, which the checkpoint does not"),
                                        (without_last_bias, r"the checkpoint holds 4\.bias")])
def test_load_unsharded_into_another_architecture_names_the_key(saved, other, key):
    model = other()
    before = snapshot(model)
    with pytest.raises(dst_prune.DSTError, match=rf"{key}.*build the checkpoint's architecture"):
        distributed_checkpoint.load_unsharded(saved[0], model)
    assert_unchanged(model, before)


def test_a_path_without_checkpoint_or_with_a_broken_pointer_is_refused(saved, tmp_path):
    live = build(seed=7)
    with pytest.raises(dst_prune.DSTError, match="holds no checkpoint"):
        distributed_checkpoint.load(tmp_path / "nothing", *live)
    (saved[0] / "latest").write_text("step-0000099")
    with pytest.raises(dst_prune.DSTError, match="names 'step-0000099'"):
        distributed_checkpoint.load(saved[0], *live)
    with pytest.raises(dst_prune.DSTError, match="is a checkpoint folder itself"):
        distributed_checkpoint.save(saved[0] / "step-0000005", *live)


# --- nothing is unpickled -------------------------------------------------------------------------------------
@pytest.mark.parametrize("forged", [False, True])
@pytest.mark.parametrize("name", [".metadata", distributed_checkpoint.CONTROLLER_FILE])
def test_a_payload_in_a_checkpoint_file_never_runs(saved, tmp_path, name, forged):
    folder = folder_of(saved[0])
    marker = tmp_path / "payload-ran"
    if name == ".metadata":
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(Payload(marker), folder / name)
    if forged:  # the manifest rewritten to match: the unpickler still refuses
        rehash(folder)
    live = build(seed=7)
    before = everything(*live)
    with pytest.raises(dst_prune.DSTError, match=name.replace(".", r"\.")):
        distributed_checkpoint.load(saved[0], *live)
    with pytest.raises(dst_prune.DSTError):
        distributed_checkpoint.load_unsharded(saved[0], mlp()) if name == ".metadata" else \
            distributed_checkpoint.controller_state(saved[0])
    assert not marker.exists()
    assert_everything_unchanged(*live, before)


# --- real processes: 2 ranks (FSDP2, gloo), saves killed at chosen points, then resumed -----------------------
WORKER = Path(__file__).parent / "workers" / "dcp_faults.py"
KILLED_AT = {"rank1_shards": 3, "before_controller": 3, "before_rename": 3, "before_pointer": 3, "before_cleanup": 6}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def layout(root: Path) -> dict:
    """What a killed save left: where `latest` points, and the files of every folder."""
    return {"latest": (root / "latest").read_text(),
            **{p.name: sorted(f.name for f in p.iterdir()) for p in sorted(root.iterdir()) if p.is_dir()}}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    base = tmp_path_factory.mktemp("dcp_faults")
    roots, left = {}, {}
    for fault in KILLED_AT:
        roots[fault] = base / fault
        result = torchrun("save", str(roots[fault]), fault)
        assert result.returncode != 0 and "SIGKILL" in result.stderr, result.stderr[-3000:]
        left[fault] = layout(roots[fault])
    kept = roots["before_cleanup"]  # both checkpoints are still there: material for the refusals
    roots["refused_rank1_shard"] = base / "refused_rank1_shard"
    shutil.copytree(kept / "step-0000003", roots["refused_rank1_shard"])
    shard = roots["refused_rank1_shard"] / "__1_0.distcp"  # only rank 1 reads it
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 1]))
    roots["refused_mixed_steps"] = base / "refused_mixed_steps"
    shutil.copytree(kept / "step-0000006", roots["refused_mixed_steps"])
    shutil.copy(kept / "step-0000003" / "dst_state.pt", roots["refused_mixed_steps"] / "dst_state.pt")
    rehash(roots["refused_mixed_steps"], step=3)
    roots["refused_rank1_only"] = base / "refused_rank1_only"  # a complete checkpoint; rank 1 runs another sparsity
    shutil.copytree(kept / "step-0000003", roots["refused_rank1_only"])
    refused_files = {n: files_of(roots[n]) for n in roots if n.startswith("refused")}
    out = base / "out"
    out.mkdir()
    result = torchrun("resume", str(out), *(f"{name}={root}" for name, root in roots.items()))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return left, ranks, roots, refused_files


@pytest.mark.slow
def test_each_kill_left_the_save_at_its_point(killed_and_resumed):
    left = killed_and_resumed[0]
    partial = {f: [v for k, v in left[f].items() if k.startswith(".partial-")] for f in left}
    assert left["rank1_shards"]["latest"] == "step-0000003" and len(partial["rank1_shards"]) == 1
    assert "manifest.json" not in partial["rank1_shards"][0]
    assert "__0_0.distcp" in partial["before_controller"][0] and "dst_state.pt" not in partial["before_controller"][0]
    assert "manifest.json" in partial["before_rename"][0] and left["before_rename"]["latest"] == "step-0000003"
    assert left["before_pointer"]["latest"] == "step-0000003" and "manifest.json" in left["before_pointer"][
        "step-0000006"]
    assert left["before_cleanup"]["latest"] == "step-0000006" and "step-0000003" in left["before_cleanup"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(KILLED_AT))
def test_a_killed_save_resumes_from_the_last_complete_checkpoint_bitwise(killed_and_resumed, fault):
    ranks = killed_and_resumed[1]
    for rank in ranks:
        result = rank[fault]
        assert result["step"] == KILLED_AT[fault] and result["extra"] == {"step": KILLED_AT[fault]}
        assert result["equal_at_step"]  # weights, masks, optimizer state, controller == the uninterrupted run's
        assert result["equal_at_end"]  # and 6 steps end bitwise where 6 uninterrupted steps end
    newest = "step-0000006.1" if fault in ("before_pointer", "before_cleanup") else "step-0000006"
    assert ranks[0][fault]["after_save"] == ["latest", newest]  # the next save cleared what the kill left


@pytest.mark.slow
@pytest.mark.parametrize("name, message", [("refused_rank1_only", r"dst_state\.pt: the controller state was saved "
                                                                  r"with sparsity=0\.8.*\(on rank 1 of 2\)"),
                                           ("refused_rank1_shard", r"__1_0\.distcp differs from its SHA-256.*"
                                                                   r"\(on rank \d of 2\)"),
                                           ("refused_mixed_steps", r"weight: its weights in .* are non-zero outside "
                                                                   r"the mask saved in dst_state\.pt")])
def test_a_refusal_is_the_same_dst_error_on_every_rank_and_changes_nothing(killed_and_resumed, name, message):
    _, ranks, roots, refused_files = killed_and_resumed
    assert ranks[0][name]["refused"] == ranks[1][name]["refused"]
    assert re.search(message, ranks[0][name]["refused"])
    assert all(rank[name]["unchanged"] for rank in ranks)
    assert files_of(roots[name]) == refused_files[name]
