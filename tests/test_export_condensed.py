"""dst_prune.export(format="condensed"): constant fan-in layers as CondensedLinear, computing what the model does."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import AttentionNet
from torch import nn

import dst_prune
from dst_prune.exporting.condensed import CSR_BELOW_ROWS, CondensedLinear

ROOT = Path(__file__).resolve().parents[1]


def write_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Give a sparse layer `mask` (bool, the weight's shape), with random weights where it is active."""
    with torch.no_grad():
        module.weight_mask.copy_(mask.reshape(module.weight_mask.shape))
        module.weight_orig.copy_(torch.randn_like(module.weight_orig) * module.weight_mask)


def fan_in_mask(rows: int, inputs: int, fan_in: int, ablated: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    columns = torch.rand(rows, inputs, generator=g).topk(fan_in, dim=1).indices
    mask = torch.zeros(rows, inputs, dtype=torch.bool).scatter_(1, columns, True)
    mask[list(ablated)] = False
    return mask


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()} | {
        n: b.clone() for n, b in model.named_buffers() if n.endswith("_mask")}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("bias", [True, False])
def test_condensed_mlp_matches_the_sparse_model_on_both_kernels(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=bias), nn.ReLU(), nn.Linear(96, 48, bias=bias), nn.ReLU(),
                          nn.Linear(48, 10, bias=bias))
    dst_prune.apply(model, sparsity=0.75, granularity="1:4", dense_stem_and_head=False)
    before = snapshot(model)
    exported = dst_prune.export(model, format="condensed")
    layers = [exported[0], exported[2], exported[4]]
    assert all(isinstance(m, CondensedLinear) for m in layers)
    assert [m.fan_in for m in layers] == [16, 24, 12] and all(len(m.rows) == m.out_features for m in layers)
    assert all((m.bias is not None) == bias for m in layers)
    assert not exported.training and not any(p.requires_grad for p in exported.parameters())
    model.eval()
    # CSR (one row, a few), embedding_bag in one block, and over blocks of BLOCK_ELEMENTS // in_features rows
    for shape in [(1, 64), (CSR_BELOW_ROWS - 1, 64), (CSR_BELOW_ROWS, 64), (3, 7, 64), (3, 700, 64)]:
        x = torch.randn(shape)
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    assert_unchanged(model, before)
    assert dst_prune.is_sparse(model) and not dst_prune.is_sparse(exported)


@pytest.mark.parametrize("bias", [True, False])
def test_ablated_rows_output_their_bias(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 40, bias=bias), nn.Tanh(), nn.Linear(40, 24, bias=bias))
    dst_prune.apply(model, sparsity=0.8, dense_stem_and_head=False)
    write_mask(model[0], fan_in_mask(40, 32, 5, ablated=(0, 7, 39)))
    write_mask(model[2], fan_in_mask(24, 40, 9, ablated=(3,), seed=1))
    exported = dst_prune.export(model, format="condensed")
    first = exported[0]
    assert isinstance(first, CondensedLinear) and first.fan_in == 5
    assert first.rows.tolist() == [r for r in range(40) if r not in (0, 7, 39)]
    assert first.indices.dtype == torch.long and first.indices.shape == first.weight.shape == (37, 5)
    assert torch.equal(first.indices, first.indices.sort(1).values)
    model.eval()
    for rows in (1, 20):
        x = torch.randn(rows, 32)
        hidden = first(x)
        expected = model[0].bias[[0, 7, 39]] if bias else torch.zeros(3)
        assert torch.equal(hidden[:, [0, 7, 39]], expected.expand(rows, 3))
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    if bias:  # the ablated rows' outputs are copies: forwards never write into the bias
        assert torch.equal(first.bias, model[0].bias)


class PointwiseNet(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 32, 1, bias=bias)
        self.bn = nn.BatchNorm2d(32)
        self.reduce = nn.Conv2d(32, 8, 1, stride=2, bias=bias)
        self.spatial = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.expand(torch.relu(self.stem(x)))))
        return self.head(self.spatial(self.reduce(x)).mean((2, 3)))


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_convs_are_condensed_and_others_stay_dense(bias, caplog):
    torch.manual_seed(0)
    model = PointwiseNet(bias)
    dst_prune.apply(model, sparsity=0.75, exclude=["spatial.weight"])
    write_mask(model.expand, fan_in_mask(32, 16, 4, ablated=(5,)))
    write_mask(model.reduce, fan_in_mask(8, 32, 8, seed=2))
    with caplog.at_level(logging.INFO, logger="dst_prune.exporting.condensed"):
        exported = dst_prune.export(model, format="condensed")
    assert isinstance(exported.expand, CondensedLinear) and isinstance(exported.reduce, CondensedLinear)
    assert exported.reduce.stride == 2 and len(exported.expand.rows) == 31
    assert type(exported.head) is nn.Linear  # the head stays dense by default: not sparse, not condensed
    model.eval()
    for batch, size in [(1, 2), (1, 6), (3, 9)]:  # rows of the two 1x1 convs: 4 and 1, 36 and 9, 243 and 75
        x = torch.randn(batch, 3, size, size)
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 3, 2, 2).to(memory_format=torch.channels_last)
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_layers_without_constant_fan_in_stay_dense_and_are_logged(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    dst_prune.apply(model, sparsity=0.75, dense_stem_and_head=False)
    write_mask(model[2], fan_in_mask(32, 32, 8))
    mask = fan_in_mask(32, 16, 4)
    mask[3, :] = True  # one row with 16 active inputs
    write_mask(model[0], mask)
    with caplog.at_level(logging.INFO, logger="dst_prune.exporting.condensed"):
        exported = dst_prune.export(model, format="condensed")
    assert type(exported[0]) is nn.Linear and isinstance(exported[2], CondensedLinear)
    assert "0 stays dense: its fan-in is not constant: active rows have 4 to 16 active inputs" in caplog.text
    x = torch.randn(5, 16)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_multihead_attention_out_proj_is_left_to_its_parent(caplog):
    torch.manual_seed(0)
    model = AttentionNet()
    dst_prune.apply(model, sparsity=0.5, granularity="1:2")
    with caplog.at_level(logging.INFO, logger="dst_prune.exporting.condensed"):
        exported = dst_prune.export(model, format="condensed")
    assert isinstance(exported.proj, CondensedLinear)
    assert type(exported.attn.out_proj) is type(model.attn.out_proj) and not isinstance(exported.attn.out_proj,
                                                                                       CondensedLinear)
    assert "attn.out_proj stays dense: its parent attn (MultiheadAttention) reads its weight" in caplog.text
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_refusals_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    dst_prune.apply(model, sparsity=0.9, dense_stem_and_head=False)
    before = snapshot(model)
    with pytest.raises(dst_prune.DSTError, match=r"format='condensed' found no layer to condense \(0: a 3x3 Conv2d "
                                                 r"with groups=1 .*3: its fan-in is not constant.*format='csr'"):
        dst_prune.export(model, format="condensed")
    assert_unchanged(model, before)
    with pytest.raises(dst_prune.DSTError, match="valid choices: dense, csr, semi_structured, condensed, shrink"):
        dst_prune.export(model, format="condense")
    with pytest.raises(dst_prune.DSTError, match="model has no dst_prune masks"):
        dst_prune.export(nn.Linear(4, 4), format="condensed")


def test_state_dict_round_trip_rebuilds_the_kernel_indices():
    def exported(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        dst_prune.apply(model, sparsity=0.75, granularity="1:4", dense_stem_and_head=False)
        return dst_prune.export(model, format="condensed")

    source, target = exported(0), exported(1)
    assert set(source.state_dict()) == {f"{i}.{k}" for i in (0, 2) for k in ("indices", "weight", "bias", "rows")}
    target.load_state_dict(source.state_dict())
    for x in (torch.randn(1, 32), torch.randn(40, 32)):
        torch.testing.assert_close(target(x), source(x))


@pytest.mark.slow
def test_condensed_benchmark_smoke(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "condensed.py"), "--width", "256", "--vit-img-size", "32",
               "--vit-depth", "2", "--batches", "1", "4", "--sparsities", "0.9", "--repeats", "2", "--threads", "1",
               "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "condensed.json").read_text())
    assert set(report) == {"machine", "commit", "command", "repeats", "threads", "results"}
    rows = report["results"]
    assert {(r["model"], r["batch"]) for r in rows} == {(m, b) for m in ("mlp", "vit_small_mlp") for b in (1, 4)}
    assert all({"dense_ms", "csr_ms", "condensed_ms", "condensed_speedup", "csr_speedup", "fan_in"} <= set(r)
               for r in rows)
    assert "| condensed" in (tmp_path / "condensed.md").read_text()
