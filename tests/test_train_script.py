"""scripts/train.py as users run it: real processes, real DDP over gloo, real checkpoints on disk, real data."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import dst_prune
from dst_prune._bits import unpack_bits
from dst_prune.training.datasets import ShardedEpochSampler
from dst_prune.training.models import register_timm_models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
MNIST_SLICE = ["--dataset", "mnist", "--train-subset", "640", "--val-subset", "500", "--batch-size", "16"]


@pytest.fixture(autouse=True, scope="module")
def _temporary_files_under_pytest(tmp_path_factory):
    """The processes these tests start keep their temporary files (torchrun's logs) in pytest's folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield


def train(*args: str, processes: int = 1, datapath: Path | None = None, cwd: Path | None = None) -> str:
    env = {**os.environ, "DATAPATH": str(datapath or "")}
    if processes == 1:
        command = [sys.executable, str(SCRIPT), "--cpu", *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(SCRIPT), "--cpu", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def ranks(output: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((output / "ranks").glob("rank*.json"))]


def checkpoint_state(folder: Path) -> dict:
    """Everything a checkpoint holds, as tensors and plain values (read the only way the loader reads them)."""
    state = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            state[path.name] = safetensors.torch.load_file(path)
        elif path.suffix == ".pt":
            state[path.name] = torch.load(path, weights_only=True)
        elif path.name != "manifest.json":
            state[path.name] = json.loads(path.read_text())
    return state


def rewrite_manifest(folder: Path) -> None:
    """After changing a file on purpose: make the manifest agree (a consistent checkpoint of other contents)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_sampler_shards_are_disjoint_equal_and_resume_mid_epoch():
    shards = [ShardedEpochSampler(103, batch_size=8, rank=r, world_size=2, seed=3) for r in range(2)]
    for shard in shards:
        shard.set_epoch(4)
    indices = [list(s) for s in shards]
    assert len(indices[0]) == len(indices[1]) == 48 and not set(indices[0]) & set(indices[1])
    shards[0].set_epoch(4, skip_batches=2)
    assert list(shards[0]) == indices[0][16:]
    shards[0].set_epoch(5)
    assert list(shards[0]) != indices[0]


DEMO = ["--epochs", "15"]  # `make run` (30 epochs), shorter


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """The main job, as `make run` starts it: its output folder and what it printed."""
    folder = tmp_path_factory.mktemp("demo")
    stdout = train(*DEMO, "--output-dir", str(folder / "run"), cwd=folder)
    return folder / "run", stdout


def test_default_main_job_on_bundled_digits(demo):
    run, stdout = demo
    assert "# nonzero parameters in sparse" in stdout and "Parameter tensor" in stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_accuracy"] > 0.9 and f"{summary['sparsity']:.4f}" == "0.9000"
    # DSR reallocates as in the DSR paper's LeNet-300-100 recipe, relative to training: every 100 steps, the period
    # doubling at 25%, 50% and 75% (steps 165, 330, 495), none from 90% (step 594). Weights regrown late would stay
    # near zero while the learning rate decays to zero: few of the active weights are
    with (run / "history.csv").open() as f:
        updates = [int(row["step"]) for row in csv.DictReader(f)]
    assert summary["steps"] == 660 and updates == [100, 200, 400] and summary["updates"] == 3
    weights, state = (safetensors.torch.load_file(run / "model.safetensors"),
                      torch.load(run / "dst_state.pt", weights_only=True))
    active = torch.cat([weights[name][unpack_bits(packed, weights[name].shape)]
                        for name, packed in zip(state["targets"], state["masks"])])
    assert len(active) == 4920 and int((active.abs() < 1e-3).sum()) < 0.1 * len(active)
    for name in ("sum_table.txt", "stats_table.txt", "history.csv", "density.png", "train.csv", "val.csv"):
        assert (run / name).stat().st_size > 0, name
    # the plain weights load into an untouched model, rebuilt from the arguments summary.json records, and
    # compute what the sparse one does; with the saved masks the sparse model is back, exactly
    arguments = dict(summary["model"])
    register_timm_models()
    dense = timm.create_model(arguments.pop("name"), **arguments)
    dense.load_state_dict(safetensors.torch.load_file(run / "model.safetensors"))
    sparse = timm.create_model("lenet_300_100", num_classes=10, in_chans=1, img_size=8)
    loaded = dst_prune.load_sparse_state_dict(sparse, safetensors.torch.load_file(run / "model.safetensors"),
                                              masks=torch.load(run / "dst_state.pt", weights_only=True))
    assert f"{loaded.sparsity:.4f}" == "0.9000"
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(sparse.eval()(x), dense.eval()(x))


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes_exactly(demo, tmp_path):
    straight, _ = demo
    stop = signal.SIGINT
    output = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--cpu", *DEMO, "--output-dir", str(output)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    while not (output / "train.csv").is_file():  # training has begun
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.005)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + stop and "Traceback" not in stderr, stderr[-3000:]
    assert "\r" not in stderr  # into a file, progress is a log line, not a bar redrawn with carriage returns
    step = int(re.search(r"stopped by SIGINT after optimizer step (\d+) of 660", stderr).group(1))
    assert 0 < step < 660 and (output / "checkpoints" / f"step-{step:07d}" / "manifest.json").is_file()
    command = stderr.split("Resume with:\n")[1].splitlines()[0].strip()
    assert command.endswith("--resume latest") and f"{SCRIPT} --cpu --epochs 15 --output-dir" in command
    resumed = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = "step-0000660"
    assert_same(checkpoint_state(straight / "checkpoints" / final), checkpoint_state(output / "checkpoints" / final))
    assert ranks(straight) == ranks(output)
    for log in ("train.csv", "val.csv"):
        assert (straight / log).read_text() == (output / log).read_text()


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_saves_on_every_rank_and_resumes(tmp_path):
    """A scheduler's preemption: SIGTERM to the launcher, which forwards it to both ranks; they agree on one step."""
    output, flags = tmp_path / "run", ["--cpu", "--epochs", "30", "--checkpoint-every", "1000"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    process = subprocess.Popen([*launch, str(SCRIPT), *flags, "--output-dir", str(output)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (output / "train.csv").is_file():
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    step = int(re.search(r"stopped by SIGTERM after optimizer step (\d+) of 660", stderr).group(1))
    saved = output / "checkpoints" / f"step-{step:07d}"
    assert 0 < step < 660 and step % 10 == 0  # the ranks compare their requests every 10 steps
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(json.loads((saved / "manifest.json").read_text())["files"])
    command = stderr.split("Resume with:\n")[1].splitlines()[0].strip()
    assert command.startswith("accelerate launch --multi_gpu --num_processes 2 ")
    assert command.endswith("--resume latest")
    resumed = subprocess.run([*launch, *shlex.split(command)[5:]], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved} at epoch" in resumed.stderr
    assert [r["steps"] for r in ranks(output)] == [660, 660] and ranks(output)[0] == ranks(output)[1]


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_masks_and_weights(datapath, tmp_path):
    train(*MNIST_SLICE, "--max-steps", "24", "--update-every", "4", "--method", "rigl", "--check-sync",
          "--output-dir", str(tmp_path), processes=2, datapath=datapath)
    rank0, rank1 = ranks(tmp_path)
    assert rank0 == rank1 and rank0["updates"] == 4 and rank0["steps"] == 24


RESUME_RUN = [*MNIST_SLICE, "--max-steps", "30", "--update-every", "3", "--grad-accum", "2", "--checkpoint-every", "7",
              "--keep-checkpoints", "10", "--ema", "0.9"]


def resume_runs(tmp_path: Path, datapath: Path, processes: int, method: str) -> tuple[Path, Path]:
    """An uninterrupted run, and one resumed from its (mid-epoch) checkpoint at step 7."""
    common = [*RESUME_RUN, "--method", method]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*common, "--output-dir", str(straight), processes=processes, datapath=datapath)
    train(*common, "--output-dir", str(resumed), "--resume", str(straight / "checkpoints" / "step-0000007"),
          processes=processes, datapath=datapath)
    return straight, resumed


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "method"), [(1, "snfs"), (1, "set"), (2, "rigl")])
def test_resume_mid_epoch_is_bitwise_exact(datapath, tmp_path, processes, method):
    straight, resumed = resume_runs(tmp_path, datapath, processes, method)
    final = "step-0000030"
    assert_same(checkpoint_state(straight / "checkpoints" / final), checkpoint_state(resumed / "checkpoints" / final))
    assert ranks(straight) == ranks(resumed)
    progress = json.loads((straight / "checkpoints" / "step-0000007" / "progress.json").read_text())
    assert 0 < progress["batch"] < 20 and progress["epoch"] == 0  # the resume point is mid-epoch
    assert ranks(straight)[0]["updates"] > 0
    if method == "set":  # negative control: a checkpoint whose controller state was rewound gives other masks
        tampered = tmp_path / "tampered-step-7"
        shutil.copytree(straight / "checkpoints" / "step-0000007", tampered)
        state = torch.load(tampered / "dst.pt", weights_only=True)
        state["update_index"] -= 1  # other growth draws from here on
        torch.save(state, tampered / "dst.pt")
        rewrite_manifest(tampered)
        train(*RESUME_RUN, "--method", method, "--output-dir", str(tmp_path / "rewound"), "--resume", str(tampered),
              processes=processes, datapath=datapath)
        assert ranks(straight)[0]["mask_digest"] != ranks(tmp_path / "rewound")[0]["mask_digest"]


@pytest.mark.slow
def test_gradient_accumulation_counts_optimizer_steps(datapath, tmp_path):
    train(*MNIST_SLICE, "--max-steps", "8", "--grad-accum", "3", "--update-every", "2", "--method", "set",
          "--output-dir", str(tmp_path), datapath=datapath)
    (rank,) = ranks(tmp_path)
    assert rank["steps"] == 8 and rank["micro_batches"] == 24 and rank["updates"] == 4


@pytest.mark.slow
def test_bf16_autocast_smoke(tmp_path):
    train("--dataset", "synthetic", "--model", "resnet18", "--img-size", "32", "--batch-size", "8", "--method", "set",
          "--max-steps", "6", "--update-every", "2", "--mixed-precision", "bf16", "--channels-last",
          "--output-dir", str(tmp_path), cwd=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert f"{summary['sparsity']:.4f}" == "0.9000" and summary["updates"] == 3
    assert torch.isfinite(torch.tensor(summary["val_loss"]))


@pytest.mark.slow
def test_cifar10_jpeg_zip_as_imagefolder(datapath, tmp_path):
    archive = datapath / "cifar10-jpeg.zip"
    if not archive.is_file():
        pytest.skip("cifar10-jpeg.zip not in DATAPATH")
    os.environ["DST_PRUNE_CACHE"] = str(tmp_path / "cache")
    try:
        train("--dataset", "imagefolder", "--data", str(archive), "--img-size", "32", "--model", "resnet18",
              "--train-subset", "64", "--val-subset", "64", "--batch-size", "16", "--max-steps", "4",
              "--update-every", "2", "--output-dir", str(tmp_path / "run"), datapath=datapath)
    finally:
        del os.environ["DST_PRUNE_CACHE"]
    assert not any(datapath.glob("cifar10-jpeg-*"))  # nothing written next to the archive
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
