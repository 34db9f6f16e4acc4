"""`load_checkpoint` checks every file before it writes anything: malformed or mismatched optimizer, LR schedule
and random generator states, other dtypes, non-finite weights, duplicate keys, and names or links that leave the
checkpoint folder are refused with a `DSTError` naming the file; the run and the files stay exactly as they were."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_checkpoints import Run, rewrite_manifest, same

import dst_prune
from dst_prune.training.checkpoints import find_checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    run = Run()
    run.train(5)
    return save_checkpoint(tmp_path_factory.mktemp("pristine") / "checkpoints", 5, **run.objects)


@pytest.fixture
def saved(pristine, tmp_path) -> Path:
    folder = tmp_path / "checkpoints" / pristine.name
    shutil.copytree(pristine, folder)
    return folder


def files_of(folder: Path) -> dict:
    """Every file under `folder` (links as links), by content: to check that a refusal wrote nothing."""
    return {str(p.relative_to(folder)): (str(p.readlink()) if p.is_symlink() else hashlib.sha256(p.read_bytes())
                                         .hexdigest()) for p in sorted(folder.rglob("*")) if not p.is_dir()}


def refused(folder: Path, message: str, run: Run | None = None) -> None:
    """Loading `folder` raises a DSTError matching `message`; the run and every file are unchanged."""
    run = run or Run(seed=3)
    before, files = run.fingerprint(), files_of(folder.parent)
    with pytest.raises(dst_prune.DSTError, match=message):
        load_checkpoint(folder, **run.objects)
    assert same(run.fingerprint(), before)
    assert files_of(folder.parent) == files


def edit_torch(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    rewrite_manifest(path.parent)


def edit_json(path: Path, change) -> None:
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))
    rewrite_manifest(path.parent)


def _set(key: str, value: object):
    return lambda state: state.__setitem__(key, value)


def _momentum(state: dict, value: torch.Tensor) -> None:
    state["state"][next(iter(state["state"]))]["momentum_buffer"] = value


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: _momentum(s, torch.zeros(3)), r"optimizer\.pt: state 'momentum_buffer' of parameter 0 .* has shape"),
    (lambda s: _momentum(s, torch.zeros(8, 3, 3, 3, dtype=torch.float64)),
     r"optimizer\.pt: state 'momentum_buffer' of parameter 0 .* is torch\.float64, the parameter is torch\.float32"),
    (lambda s: _momentum(s, torch.full((8, 3, 3, 3), float("nan"))), r"optimizer\.pt: .* non-finite"),
    (lambda s: s["state"][0].__setitem__("step", torch.tensor(99.0)), r"optimizer\.pt: state 'step' .* is step"),
    (lambda s: s["state"][0].__setitem__("step", -1), r"optimizer\.pt: state 'step' .* is step -1"),
    (lambda s: s["param_groups"][0].__setitem__("lr", "0.1"), r"optimizer\.pt: parameter group 0 has lr='0\.1'"),
    (lambda s: s["param_groups"][0].pop("momentum"), r"optimizer\.pt: parameter group 0 has no 'momentum'"),
    (lambda s: s["param_groups"][0]["params"].__setitem__(0, 1), r"optimizer\.pt names a parameter index twice"),
    (lambda s: s.pop("state"), r"optimizer\.pt is not an optimizer\.state_dict\(\)"),
    (lambda s: s["state"].__setitem__(99, {"momentum_buffer": torch.zeros(1)}), r"parameter 99 names no parameter"),
])
def test_optimizer_state_that_does_not_fit_the_live_parameters_is_refused(saved, change, message):
    edit_torch(saved / "optimizer.pt", change)
    refused(saved, message)


@pytest.mark.parametrize(("change", "message"), [
    (_set("lr_lambdas", [1]), r"scheduler\.json: lr_lambdas=\[1\] is not a value of the kind"),
    (_set("base_lrs", "0.05"), r"scheduler\.json: base_lrs='0\.05'"),
    (_set("last_epoch", "5"), r"scheduler\.json: last_epoch='5'"),
    (_set("last_epoch", 50), r"scheduler\.json: last_epoch=50; expected a whole number in \[0, 5\]"),
    (_set("step_size", 3), r"scheduler\.json is not the state of .* \(unknown keys \['step_size'\]"),
    (lambda s: s.pop("base_lrs"), r"scheduler\.json is not the state .* missing \['base_lrs'\]"),
])
def test_a_malformed_lr_schedule_state_is_refused(saved, change, message):
    edit_json(saved / "scheduler.json", change)
    refused(saved, message)


@pytest.mark.parametrize(("change", "message"), [
    (_set("python", "abc"), r"rng-rank0\.pt: its Python state is not 625 integers"),
    (_set("python", [0] * 624 + [700]), r"rng-rank0\.pt: a generator refuses it"),
    (_set("torch", torch.zeros(5, dtype=torch.float32)), r"rng-rank0\.pt: its torch state is not a 1-D uint8"),
    (_set("torch", torch.zeros(5, dtype=torch.uint8)), r"rng-rank0\.pt: a generator refuses it"),
    (_set("numpy", [1, 2]), r"rng-rank0\.pt: its numpy position is not \[int, int, float\]"),
    (_set("numpy_keys", torch.zeros(3, dtype=torch.int64)), r"rng-rank0\.pt: its numpy keys are not 624"),
    (lambda s: s.pop("numpy_keys"), r"rng-rank0\.pt holds no random number generator state"),
])
def test_a_malformed_random_generator_state_is_refused(saved, change, message):
    edit_torch(saved / "rng-rank0.pt", change)
    refused(saved, message)


def test_progress_of_another_step_than_the_manifest_is_refused(saved):
    edit_json(saved / "progress.json", _set("optimizer_steps", 4))
    refused(saved, r"manifest\.json is of step 5, progress\.json of step 4")


def _edit_safetensors(path: Path, change) -> None:
    state = safetensors.torch.load_file(path)
    change(state)
    safetensors.torch.save_file(state, path)
    rewrite_manifest(path.parent)


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors"])
def test_weights_of_another_dtype_or_non_finite_are_refused(saved, name):
    _edit_safetensors(saved / name, lambda s: s.__setitem__("head.bias", s["head.bias"].double()))
    refused(saved, rf"head\.bias: the tensor in .*{name} is torch\.float64, the model's is torch\.float32")
    _edit_safetensors(saved / name, lambda s: s.__setitem__("head.bias", s["head.bias"].float()))
    load_checkpoint(saved, **Run(seed=3).objects)  # the same values back in float32: accepted

    def poison(state: dict) -> None:
        state["head.weight"][0, 0] = float("inf")
    _edit_safetensors(saved / name, poison)
    refused(saved, rf"head\.weight: the tensor in .*{name} has 1 non-finite values")


def test_duplicate_keys_are_refused(saved, pristine):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    key = "head.bias"
    text = json.dumps(header)[:-1] + f', "{key}": {json.dumps(header[key])}}}'  # the same entry twice
    text += " " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data[8 + size:])
    rewrite_manifest(saved)
    refused(saved, r"model\.safetensors holds the key 'head\.bias' twice")

    shutil.copyfile(pristine / "model.safetensors", path)
    text = (saved / "scheduler.json").read_text()
    (saved / "scheduler.json").write_text(text[:-1] + ', "last_epoch": 2}')
    rewrite_manifest(saved)
    with pytest.raises(dst_prune.DSTError, match="twice"):
        load_checkpoint(saved, **Run(seed=3).objects)


def test_manifest_names_that_leave_the_folder_are_refused(saved):
    outside = saved.parent / "x"
    outside.write_bytes(b"planted")
    digest = hashlib.sha256(b"planted").hexdigest()
    for name in ("../x", str(outside)):
        manifest = json.loads((saved / "manifest.json").read_text())
        manifest["files"] = {**manifest["files"], name: digest}
        (saved / "manifest.json").write_text(json.dumps(manifest))
        refused(saved, "leaves the checkpoint folder")
        rewrite_manifest(saved)


def test_symbolic_links_in_a_checkpoint_are_refused(saved, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(saved / "optimizer.pt", elsewhere / "optimizer.pt")
    (saved / "optimizer.pt").symlink_to(elsewhere / "optimizer.pt")  # same bytes: the manifest's hash matches
    refused(saved, r"optimizer\.pt is a symbolic link")


@pytest.mark.parametrize("pointer", ["../other/step-0000005", "/tmp/step-0000005", "linked"])
def test_a_latest_pointer_that_leaves_the_folder_is_refused(saved, tmp_path, pointer):
    directory = saved.parent
    other = tmp_path / "other"
    shutil.copytree(saved, other / saved.name)
    (directory / "linked").symlink_to(other / saved.name)
    (directory / "latest").write_text(pointer)
    files = files_of(directory)
    with pytest.raises(dst_prune.DSTError, match=r"leaves the checkpoint folder|is a symbolic link"):
        find_checkpoint("latest", directory)
    assert files_of(directory) == files
