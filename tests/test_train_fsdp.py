"""scripts/train.py --fsdp: real processes (torchrun and accelerate launch, gloo, CPU), FSDP2 against DDP, resume
from a sharded checkpoint, the final files; the flags and checkpoints it refuses; the block rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import AttentionNet, SmallCNN
from test_train_resume import files_of
from test_train_script import ROOT, SCRIPT, assert_same, ranks
from torch import nn

import dst_prune
from dst_prune._bits import unpack_bits
from dst_prune.distributed import checkpoint as distributed_checkpoint
from dst_prune.training.checkpoints import TrainingProgress
from dst_prune.training.extra_state import check_training_extra, load_training_extra, training_extra
from dst_prune.training.models import register_timm_models

sys.path.insert(0, str(ROOT / "scripts"))
import train
from train_fsdp import blocks

register_timm_models()  # lenet_300_100 by name, as the script builds it

# LeNet-300-100 on the bundled digits: 22 batches of 32 per rank and epoch, 2 per optimizer step, so the epoch ends
# at step 11 (a validation pass over 359 samples: 180 and 179 per rank, padded); RigL reallocates at steps 3 and 6
# (none from 75% of training on)
FLAGS = ["--cpu", "--max-steps", "12", "--update-every", "3", "--grad-accum", "2", "--clip-grad", "1", "--method",
         "rigl", "--check-sync", "--checkpoint-every", "4", "--keep-checkpoints", "10", "--log-every", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(autouse=True, scope="module")
def _temporary_files_under_pytest(tmp_path_factory):
    """The processes these tests start keep their temporary files (torchrun's logs) in pytest's folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield


def launch(launcher: list[str], output: Path, *extra: str) -> str:
    result = subprocess.run([*launcher, str(SCRIPT), *FLAGS, "--output-dir", str(output), *extra], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The FSDP run (torchrun), the same run under DDP (accelerate launch), and the FSDP run resumed from its
    step-4 checkpoint (accelerate launch): what a run killed after that checkpoint does when it resumes."""
    folder = tmp_path_factory.mktemp("fsdp_script")
    fsdp, ddp, resumed = folder / "fsdp", folder / "ddp", folder / "resumed"
    logs = {"fsdp": launch(TORCHRUN, fsdp, "--fsdp"), "ddp": launch(ACCELERATE, ddp),
            "resumed": launch(ACCELERATE, resumed, "--fsdp", "--resume", str(fsdp / "checkpoints" / "step-0000004"))}
    return {"fsdp": fsdp, "ddp": ddp, "resumed": resumed, "logs": logs}


def dcp_state(folder: Path, tmp_path: Path) -> dict:
    """Model and optimizer of a sharded checkpoint, as one process reads them (DCP's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{folder.parent.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(target))
    return torch.load(target, weights_only=True)


def masks(state: dict, shapes: dict) -> dict:
    return {name: unpack_bits(packed, shapes[name]) for name, packed in zip(state["targets"], state["masks"])}


@pytest.mark.slow
def test_fsdp_run_ends_with_the_masks_weights_and_optimizer_state_of_the_ddp_run(runs, tmp_path):
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    assert "fully_shard on 2 blocks (1, 3), then the root, across 2 processes" in runs["logs"]["fsdp"]
    rank0, rank1 = ranks(fsdp)
    assert rank0 == rank1  # every rank: the same gathered masks, weights, steps (and --check-sync at every update)
    assert rank0["updates"] == 2 and rank0["steps"] == 12 and rank0["micro_batches"] == 24
    ddp_rank0 = ranks(ddp)[0]
    assert rank0["weights_abs_sum"] == pytest.approx(ddp_rank0.pop("weights_abs_sum"), rel=1e-12)
    assert {k: v for k, v in rank0.items() if k != "weights_abs_sum"} == ddp_rank0  # the masks' digest, the counts
    weights, ddp_weights = (safetensors.torch.load_file(run / "model.safetensors") for run in (fsdp, ddp))
    assert_same(weights, ddp_weights)  # bitwise
    shapes = {name: tensor.shape for name, tensor in weights.items()}
    state, ddp_state = (torch.load(run / "dst_state.pt", weights_only=True) for run in (fsdp, ddp))
    assert_same(masks(state, shapes), masks(ddp_state, shapes))
    assert state["history"] == ddp_state["history"] and sum(sum(h["grown"]) for h in state["history"]) > 0
    sharded = dcp_state(fsdp / "checkpoints" / "step-0000012", tmp_path)["optimizer"]
    whole = torch.load(ddp / "checkpoints" / "step-0000012" / "optimizer.pt", weights_only=True)
    # the DDP run built its optimizer before apply, on the parameters in the model's original order
    order = [name for name, _ in timm.create_model("lenet_300_100", in_chans=1, img_size=8).named_parameters()]
    names = [f"{n}_orig" if f"{n}_orig" in sharded["state"] else n for n in order]
    assert_same({names[i]: s for i, s in whole["state"].items()}, sharded["state"])
    fsdp_summary, ddp_summary = (json.loads((run / "summary.json").read_text()) for run in (fsdp, ddp))
    assert fsdp_summary["val_loss"] == ddp_summary["val_loss"]  # the padded validation counts each sample once
    assert fsdp_summary["val_accuracy"] == ddp_summary["val_accuracy"]
    assert (fsdp / "val.csv").read_text() == (ddp / "val.csv").read_text()


@pytest.mark.slow
def test_a_resumed_fsdp_run_ends_bitwise_equal_to_the_uninterrupted_one(runs, tmp_path):
    straight, resumed = runs["fsdp"], runs["resumed"]
    assert f"resumed from {straight / 'checkpoints' / 'step-0000004'} at epoch 0, batch 8, step 4" in \
        runs["logs"]["resumed"]
    for step in ("step-0000008", "step-0000012"):
        a, b = (run / "checkpoints" / step for run in (straight, resumed))
        assert_same(dcp_state(a, tmp_path), dcp_state(b, tmp_path), step)  # weights and optimizer state
        assert_same(distributed_checkpoint.controller_state(a), distributed_checkpoint.controller_state(b), step)
        extra = [distributed_checkpoint.extra_state(x) for x in (a, b)]
        assert extra[0]["rng"] == extra[1]["rng"] and extra[0]["progress"] == extra[1]["progress"]
        assert extra[0]["scheduler"] == extra[1]["scheduler"] and len(extra[0]["rng"]) == 2
    assert ranks(straight) == ranks(resumed)
    assert_same(*(safetensors.torch.load_file(run / "model.safetensors") for run in (straight, resumed)))
    assert_same(*(torch.load(run / "dst_state.pt", weights_only=True) for run in (straight, resumed)))
    assert (straight / "val.csv").read_text() == (resumed / "val.csv").read_text()  # the epoch-end pass at step 11
    train_rows = (straight / "train.csv").read_text().splitlines()
    assert (resumed / "train.csv").read_text().splitlines() == train_rows[:1] + train_rows[5:]  # steps 5 to 12


@pytest.mark.slow
def test_final_weights_load_strictly_into_an_untouched_model_and_compute_what_the_trained_one_did(runs):
    run = runs["fsdp"]
    summary = json.loads((run / "summary.json").read_text())
    arguments = dict(summary["model"])
    dense = timm.create_model(arguments.pop("name"), **arguments)
    dense.load_state_dict(safetensors.torch.load_file(run / "model.safetensors"), strict=True)
    from_checkpoint = timm.create_model("lenet_300_100", **arguments)  # the last sharded checkpoint, on one process
    state = distributed_checkpoint.load_unsharded(run / "checkpoints", from_checkpoint)
    assert_same(dict(dense.state_dict()), state)
    sparse = timm.create_model("lenet_300_100", **arguments)
    loaded = dst_prune.load_sparse_state_dict(sparse, safetensors.torch.load_file(run / "model.safetensors"),
                                              masks=torch.load(run / "dst_state.pt", weights_only=True))
    assert f"{loaded.sparsity:.4f}" == "0.9000"
    from dst_prune.training.datasets import build_datasets

    val = build_datasets("digits", None).val
    x, y = torch.stack([val[i][0] for i in range(len(val))]), torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        out = dense.eval()(x)
        assert torch.equal(out, sparse.eval()(x)) and torch.equal(out, from_checkpoint.eval()(x))
    # what the trained, sharded model computed in the run (its validation on both ranks, summed in another order)
    assert nn.functional.cross_entropy(out, y).item() == pytest.approx(summary["val_loss"], rel=1e-6)
    assert int((out.argmax(1) == y).sum()) / len(y) == summary["val_accuracy"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--compile"], "--compile cannot be combined with --fsdp: torch.compile of a model sharded"),
    (["--ema", "0.9"], "--ema cannot be combined with --fsdp"),
    (["--mixed-precision", "fp16"], "--mixed-precision fp16 cannot be combined with --fsdp"),
])
def test_flags_that_cannot_run_sharded_are_usage_errors(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--fsdp", "--cpu", "--output-dir", str(tmp_path / "run"), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fsdp_in_a_single_process_without_a_process_group_says_how_to_launch(tmp_path):
    if torch.distributed.is_initialized():
        pytest.skip("an earlier test left a process group in this process")
    with pytest.raises(SystemExit, match=r"--fsdp shards the model across processes.*torchrun --standalone"):
        train.main(["--fsdp", "--cpu", "--max-steps", "2", "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resuming_with_other_defining_flags_or_the_other_kind_of_run_is_refused_and_changes_nothing(runs):
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    before = {run: files_of(run) for run in (fsdp, ddp)}
    with pytest.raises(SystemExit) as exit_:  # --resume latest in the sharded run's folder
        train.main([*FLAGS, "--fsdp", "--output-dir", str(fsdp), "--resume", "latest", "--seed", "1"])
    assert "--seed (the checkpoint has 0, this run 1)" in str(exit_.value.code)
    with pytest.raises(SystemExit, match=r"step-0000012 is a sharded checkpoint, of a run with --fsdp; this run, "
                                         r"without --fsdp, cannot continue it"):
        train.main([*FLAGS, "--output-dir", str(fsdp), "--resume", "latest"])
    with pytest.raises(SystemExit, match=r"step-0000004 is a whole checkpoint, of a run without --fsdp"):
        train.main([*FLAGS, "--fsdp", "--output-dir", str(fsdp), "--resume", str(ddp / "checkpoints" / "step-0000004")])
    assert {run: files_of(run) for run in (fsdp, ddp)} == before


def _live(steps: int = 3) -> tuple:
    """A scheduler and progress at `steps` optimizer steps, as the script has them."""
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    progress = TrainingProgress()
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        progress.optimizer_steps += 1
        progress.micro_batches += 1
    progress.unlogged_losses = [0.25, float("nan")]
    return scheduler, progress


def test_the_scripts_extra_round_trips_and_a_damaged_entry_is_refused_by_name_changing_nothing():
    scheduler, progress = _live()
    torch.manual_seed(5)
    extra = json.loads(json.dumps(training_extra(scheduler=scheduler, progress=progress, run_args={"seed": 0})))
    expected = torch.rand(3)  # what the generator gives after the save
    fresh_scheduler, fresh_progress = _live(0)
    checked = check_training_extra("extra.json", extra, scheduler=fresh_scheduler, progress=fresh_progress,
                                   world_size=1, steps=3)
    load_training_extra(checked, scheduler=fresh_scheduler, progress=fresh_progress, rank=0)
    assert torch.equal(torch.rand(3), expected)
    assert fresh_scheduler.state_dict() == scheduler.state_dict() and fresh_progress.optimizer_steps == 3
    assert fresh_progress.unlogged_losses[0] == 0.25 and fresh_progress.unlogged_losses[1] != 0.25  # nan kept
    damaged = {
        "the entry progress holds": {**extra, "progress": {**extra["progress"], "epoch": -1}},
        "the progress is at optimizer step 3, the controller at step 4": extra,
        "the entry scheduler: last_epoch='3'": {**extra, "scheduler": {**extra["scheduler"], "last_epoch": "3"}},
        "the generator states of 2 processes; this run has 1": {**extra, "rng": extra["rng"] * 2},
        "the entry rng[0]['torch'] is not a list of bytes": {**extra, "rng": [{**extra["rng"][0], "torch": [256]}]},
        "not written by scripts/train.py --fsdp": {"epoch": 3},
    }
    for message, bad in damaged.items():
        live_scheduler, live_progress = _live(0)
        before = (live_scheduler.state_dict(), live_progress.state_dict())
        with pytest.raises(dst_prune.DSTError, match=r"extra\.json") as error:
            check_training_extra("extra.json", bad, scheduler=live_scheduler, progress=live_progress, world_size=1,
                                 steps=4 if "controller at step 4" in message else 3)
        assert message in str(error.value)
        assert (live_scheduler.state_dict(), live_progress.state_dict()) == before


def _block_names(model: nn.Module, **apply_arguments) -> list[str]:
    dst = dst_prune.apply(model, sparsity=0.5, **apply_arguments)
    found = blocks(model, {t.param for t in dst.targets})
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in found]


def test_the_blocks_fully_shard_wraps_before_the_root():
    assert _block_names(timm.create_model("lenet_300_100", in_chans=1, img_size=8)) == ["1", "3"]
    assert _block_names(timm.create_model("resnet18", num_classes=10)) == [
        f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    assert _block_names(vit) == ["blocks.0", "blocks.1"]
    assert _block_names(SmallCNN()) == ["conv", "depthwise", "up", "fc1"]  # no block list: each sparse layer
    # a parent that reads its child's weight itself shards with it: nn.MultiheadAttention owns in_proj_weight
    assert _block_names(AttentionNet(), exclude=["in_proj_weight"]) == ["proj", "attn"]
