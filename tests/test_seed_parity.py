"""The seed's API and experiments on dst_prune: DSModel as the seed README uses it, and the experiment scripts."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import dst_prune
from dst_prune import DSModel
from dst_prune.training.timm_models import register_timm_models

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_the_seed_readme_example_works_as_written():
    register_timm_models()
    my_dynamic_sparse_model = timm.create_model("wrn_28_2")
    model = DSModel(
        model=my_dynamic_sparse_model,
        target_sparsity=0.9
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.reparameterize()
    model.prune_by_threshold()
    model.adjust_pruning_threshold()
    model.reallocate_free_parameters()
    sum_table, stats_table = str(model.sum_table), str(model.stats_table)
    assert "# nonzero parameters in sparse" in sum_table and "0.9000" in sum_table
    assert "1467610" in sum_table  # WRN-28-2, as in the seed README
    assert "model.blocks.0.conv1.weight" in stats_table and "model.conv1.weight" not in stats_table
    names = [n for n, _ in model.named_sparse_parameters()]
    assert names[0] == "model.blocks.0.conv1.weight" and len(list(model.sparse_parameters())) == len(names)
    assert model.pruning_threshold > 0 and f"{model.sparsity:.4f}" == "0.9000"
    assert dst_prune.is_sparse(model)


def test_dsmodel_deep_copies_for_an_ema_without_its_controller():
    model = DSModel(model=nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), target_sparsity=0.5,
                    dense_stem_and_head=False)
    x = torch.randn(3, 8)
    model(x)
    copied = copy.deepcopy(model)
    assert copied.dst is None and torch.equal(copied(x), model(x))
    assert torch.equal(copied.model[0].weight_mask, model.model[0].weight_mask)


@pytest.fixture(scope="module")
def cifar_cache(tmp_path_factory):
    """One extraction of the CIFAR-10 JPEG archive for all the tests here (never next to the archive)."""
    return tmp_path_factory.mktemp("cache")


def run_script(name: str, *args: str, datapath: Path, cache: Path | None = None, cwd: Path) -> str:
    env = {**os.environ, "DATAPATH": str(datapath), **({"DST_PRUNE_CACHE": str(cache)} if cache else {})}
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_train_cifar_wrn_smoke_on_real_cifar10(datapath, cifar_cache, tmp_path):
    stdout = run_script("train_cifar_wrn.py", "-ds", "cifar10", "-w", "2", "--smoke", "--", "--cpu",
                        datapath=datapath, cache=cifar_cache, cwd=tmp_path)
    assert "wrn_28_2 on cifar10" in stdout and "at sparsity 0.9000 (dsr)" in stdout
    run = next((tmp_path / "runs").iterdir())
    stats = (run / "stats_table.txt").read_text()
    assert "shortcut" not in stats and "blocks.0.conv1.weight" in stats  # shortcuts dense, as in the paper


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["structured", "static", "dynamic"])
def test_train_cifar_resnet_spatial_bottleneck_smoke(datapath, cifar_cache, tmp_path, mode):
    stdout = run_script("train_cifar_resnet.py", "-ds", "cifar10", "-d", "20", "-sb", mode, "-q", "1", "--smoke",
                        "--", "--cpu", datapath=datapath, cache=cifar_cache, cwd=tmp_path)
    assert "cifar_resnet20 on cifar10" in stdout
    summary = json.loads(next((tmp_path / "runs").iterdir()).joinpath("summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["val_accuracy"] <= 1


@pytest.mark.slow
def test_train_char_rnn_smoke_on_tinyshakespeare(datapath, tmp_path):
    if not (datapath / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip("tinyshakespeare not in DATAPATH")
    stdout = run_script("train_char_rnn.py", "--smoke", "--cpu", "--output-dir", str(tmp_path / "run"),
                        datapath=datapath, cwd=tmp_path)
    assert "bits per character at sparsity 0.9000 (dsr)" in stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["vocabulary"]) == 65 and summary["val_bits_per_character"] > 0


def test_spatial_bottleneck_resnet_masks_the_first_activation_of_each_block():
    model = timm.create_model("cifar_resnet20", sb_mode="structured", sb_q=1)
    outputs = []
    model.blocks[0].bn1.register_forward_hook(lambda module, args, out: outputs.append(out))
    model(torch.randn(2, 3, 32, 32))
    assert float((outputs[0] == 0).float().mean()) >= 0.75  # 3 of every 4 positions dropped
