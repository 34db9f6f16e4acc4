"""dst_prune.export(format="shrink"): pruned channels physically removed, the outputs unchanged."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.nn import functional as F

import dst_prune
from dst_prune.exporting.shrink import FoldedConv2d

ROOT = Path(__file__).resolve().parents[1]


def pruned_rows(module: nn.Module) -> int:
    return int((~module.weight_mask.reshape(module.weight_mask.shape[0], -1).any(1)).sum())


def like_trained(model: nn.Module) -> nn.Module:
    """Non-zero biases and BatchNorm statistics, so that pruned channels output non-zero constants."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=g))
                module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=g))
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_channels_are_removed_and_outputs_kept(bias):
    torch.manual_seed(0)
    model = like_trained(nn.Sequential(nn.Linear(32, 64, bias=bias), nn.ReLU(), nn.Dropout(0.2),
                                       nn.Linear(64, 48, bias=bias), nn.GELU(), nn.Linear(48, 10, bias=bias)))
    dst_prune.apply(model, sparsity=0.5, granularity="channel", dense_stem_and_head=False)
    pruned = [pruned_rows(model[i]) for i in (0, 3, 5)]
    assert pruned[0] > 10 and pruned[1] > 10 and pruned[2] > 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exported = dst_prune.export(model, format="shrink")
    assert exported[0].weight.shape == (64 - pruned[0], 32)
    assert exported[3].weight.shape == (48 - pruned[1], 64 - pruned[0])
    assert exported[5].weight.shape == (10, 48 - pruned[1])  # the head keeps its outputs
    assert not exported.training and not any(p.requires_grad for p in exported.parameters())
    x = torch.randn(6, 32)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and dst_prune.is_sparse(model)


def test_ablated_neurons_of_element_sparsity_are_removed():
    torch.manual_seed(0)
    model = like_trained(nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)))
    dst_prune.apply(model, sparsity=0.5, dense_stem_and_head=False)
    with torch.no_grad():
        model[0].weight_mask[[2, 5, 11]] = False
        model[0].weight_orig.mul_(model[0].weight_mask)
    exported = dst_prune.export(model, format="shrink")
    assert exported[0].out_features == 21 and exported[2].in_features == 21
    x = torch.randn(4, 16)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-5, atol=1e-5)


class FunctionalCNN(nn.Module):
    """Functional activations, torch.flatten over a spatial map, and a padded average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 12, 3, stride=2)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.point = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6 * 3 * 3, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.sigmoid(self.pool(self.conv(x)))
        x = torch.flatten(F.relu(self.point(x)), 1)
        return self.head(F.silu(self.fc(x)))


def plain_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.ReLU6(), nn.Conv2d(32, 24, 3, padding=1, padding_mode="reflect"),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


def test_plain_cnn_shrinks_with_batchnorm_and_padded_convs():
    torch.manual_seed(0)
    model = like_trained(plain_cnn())
    dst_prune.apply(model, sparsity=0.5, granularity="channel")  # stem and head dense
    counts = {i: pruned_rows(model[i]) for i in (4, 7, 9)}
    assert all(c > 4 for c in counts.values())
    exported = dst_prune.export(model, format="shrink")
    assert exported[0].out_channels == 16 and exported[4].out_channels == 32 - counts[4]
    assert exported[5].num_features == 32 - counts[4] and exported[5].running_mean.shape == (32 - counts[4],)
    assert type(exported[7]) is nn.Conv2d and exported[7].in_channels == 32 - counts[4]  # 1x1: folded into its bias
    assert isinstance(exported[9], FoldedConv2d) is False  # reflect padding keeps a constant plane constant
    assert exported[9].in_channels == 32 - counts[7] and exported[13].in_features == 24 - counts[9]
    assert exported[13].out_features == 10
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in exported.parameters()) < 0.6 * before
    model.eval()
    for shape in [(1, 3, 16, 16), (3, 3, 12, 10)]:
        x = torch.randn(shape)
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


def test_zero_padded_consumer_gets_the_constant_through_its_borders():
    torch.manual_seed(0)
    model = like_trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16),
                                       nn.ReLU(), nn.Conv2d(16, 8, 3, padding=2, dilation=2), nn.Flatten(),
                                       nn.Linear(8 * 4 * 4, 3)))
    dst_prune.apply(model, sparsity=0.5, granularity="channel")
    exported = dst_prune.export(model, format="shrink")
    assert isinstance(exported[4], FoldedConv2d) and exported[4].offset_weight.abs().sum() > 0
    assert exported[6].in_features == 16 * (8 - pruned_rows(model[4]))  # whole 4x4 planes removed
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_functional_forward_and_padded_average_pool():
    torch.manual_seed(0)
    model = like_trained(FunctionalCNN())
    dst_prune.apply(model, sparsity=0.5, granularity="channel")
    exported = dst_prune.export(model, format="shrink")
    # sigmoid(constant) is not 0 and a padded average pool changes a constant at the borders: conv keeps all
    assert exported.conv.out_channels == 12 and exported.point.out_channels == 6 - pruned_rows(model.point)
    assert exported.fc.in_features == 9 * exported.point.out_channels
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_residual_models_shrink_inside_blocks_and_keep_the_residual_stream(family, caplog):
    torch.manual_seed(0)
    if family == "torchvision":  # resnet18 with one block per stage
        model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    else:
        model = timm.create_model("resnet10t", num_classes=10, pretrained=False)
    like_trained(model)
    dst_prune.apply(model, sparsity=0.5, granularity="channel")
    before = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="dst_prune"):
        exported = dst_prune.export(model, format="shrink")
    assert_unchanged(model, before)
    conv1, conv2 = model.layer1[0].conv1, model.layer1[0].conv2
    # conv1 feeds bn1 -> relu -> conv2 inside the block: its pruned channels go; conv2's meet the residual addition
    assert exported.layer1[0].conv1.out_channels == conv1.out_channels - pruned_rows(conv1) < conv1.out_channels
    assert exported.layer1[0].bn1.num_features == exported.layer1[0].conv1.out_channels
    assert exported.layer1[0].conv2.out_channels > conv2.out_channels - pruned_rows(conv2)
    assert re.search(r"layer1\.0\.conv2: \d+ pruned channels stay \(\d+: the addition '\w+' ties them to channels of "
                     r"\S+ that stay active", caplog.text)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-4, atol=1e-5)


ARCHITECTURES = {  # concatenations of branches (SqueezeNet, GoogLeNet, DenseNet), permute + Linear + layer scale
    "squeezenet1_0": lambda: torchvision.models.squeezenet1_0(num_classes=10),
    "googlenet": lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=10, ls_init_value=1.0),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_real_architectures_shrink_exactly(name):
    torch.manual_seed(0)
    model = like_trained(ARCHITECTURES[name]())
    dst_prune.apply(model, sparsity=0.5, granularity="channel")
    exported = dst_prune.export(model, format="shrink")
    assert sum(p.numel() for p in exported.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-4, atol=1e-5)


class TwoProducers(nn.Module):
    """One Linear (`shared`) called on the outputs of two producers, `a` and `b`: weight sharing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 12)
        self.a, self.b = nn.Linear(12, 16), nn.Linear(12, 16)
        self.shared = nn.Linear(16, 6)
        self.mid = nn.Linear(6, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.shared(torch.relu(self.a(x))) + self.shared(torch.relu(self.b(x)))
        return self.head(torch.relu(self.mid(torch.relu(x))))


def prune_rows(module: nn.Module, rows: list[int]) -> None:
    """Make exactly `rows` of a sparse layer inactive (the others active), without training."""
    with torch.no_grad():
        module.weight_mask.fill_(True)
        module.weight_mask[rows] = False
        module.weight_orig.copy_(torch.randn_like(module.weight_orig) * module.weight_mask)


@pytest.mark.parametrize("pruning", ["different channels", "same channels, different biases", "same channels"])
def test_layer_called_on_two_producers_is_planned_once(pruning, caplog):
    torch.manual_seed(0)
    model = like_trained(TwoProducers())
    dst_prune.apply(model, sparsity=0.5, granularity="channel", exclude=["stem.weight", "shared.weight"])
    prune_rows(model.a, list(range(0, 8)))
    prune_rows(model.b, list(range(0, 8)) if pruning != "different channels" else list(range(4, 12)))
    with torch.no_grad():  # positive biases: the pruned channels output relu(bias) > 0, different in a and b
        model.a.bias.copy_(torch.rand(16) + 0.5)
        model.b.bias.copy_(model.a.bias if pruning == "same channels" else torch.rand(16) + 1.5)
    before = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="dst_prune"):
        exported = dst_prune.export(model, format="shrink")
    assert_unchanged(model, before)
    x = torch.randn(5, 8)
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert exported.mid.out_features == 10 - pruned_rows(model.mid) < 10  # the rest of the model still shrinks
    if pruning == "same channels":  # one plan fits both calls: a, b and the shared layer lose the 8 channels
        assert exported.a.out_features == exported.b.out_features == exported.shared.in_features == 8
        return
    assert exported.a.out_features == exported.b.out_features == exported.shared.in_features == 16
    for layer, other in ("a", "b"), ("b", "a"):
        assert re.search(rf"\b{layer}: 8 pruned channels stay \((\d+: [^;]+; )?\d+: shared is called on several inputs "
                         rf"whose pruned channels hold different constants", caplog.text)
        if pruning == "different channels":  # 4 channels pruned in one producer only, active in the other
            assert f"4: shared, called on both ties them to channels of {other} that stay active" in caplog.text


class OverWidth(nn.Module):
    """A Linear applied to an N,C,H,W map: over the width (`channels_last=False`) or over the channels."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)  # the map is 8 wide and has 8 channels
        self.head = nn.Linear(8 * 8 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        if self.channels_last:
            return self.head(self.fc(x.permute(0, 2, 3, 1)).flatten(1))
        return self.head(torch.flatten(self.fc(x), 1))


def test_linear_over_the_width_is_refused_by_name_and_over_the_channels_shrinks():
    torch.manual_seed(0)
    model = like_trained(OverWidth(channels_last=False))
    dst_prune.apply(model, sparsity=0.5, granularity="channel", dense_stem_and_head=False,
                    exclude=["fc.weight", "head.weight"])
    before = snapshot(model)
    with pytest.raises(dst_prune.DSTError, match=r"cannot remove the pruned channels of: conv \(4 pruned channels\) "
                                                 r"reaches fc \(Linear\): a Linear reads the last dimension of its "
                                                 r"input, and the channels are dimension -3 from the end.*"
                                                 r"exclude=\['conv\.weight'\]"):
        dst_prune.export(model, format="shrink")
    assert_unchanged(model, before)
    permuted = like_trained(OverWidth(channels_last=True))
    dst_prune.apply(permuted, sparsity=0.5, granularity="channel", dense_stem_and_head=False,
                    exclude=["fc.weight", "head.weight"])
    exported = dst_prune.export(permuted, format="shrink")
    assert exported.conv.out_channels == exported.fc.in_features == 4
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(exported(x), permuted.eval()(x), rtol=1e-5, atol=1e-5)


def test_other_refusals():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    dst_prune.apply(model, sparsity=0.5, dense_stem_and_head=False, init="magnitude")
    with pytest.raises(dst_prune.DSTError, match=r"found no pruned output channel .*granularity='channel'"):
        dst_prune.export(model, format="shrink")
    head_only = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    dst_prune.apply(head_only, sparsity=0.5, granularity="channel", include=["2.weight"], dense_stem_and_head=False)
    with pytest.raises(dst_prune.DSTError, match=r"found no channel to remove: 2: 2 pruned channels stay \(2: they "
                                                 r"reach the model's outputs, which are never changed\)"):
        dst_prune.export(head_only, format="shrink")

    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)) if x.sum() > 0 else self.b(x)

    for model, layer, operation in [
            (torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35), r"features\.2\.conv\.0\.0",
             r"features\.2\.conv\.1\.0 \(Conv2d\): a grouped convolution \(groups=48\)"),
            (timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2), r"blocks\.0\.attn\.qkv",
             r"method reshape \('reshape'\): it reshapes the channels")]:
        dst_prune.apply(model, sparsity=0.5, granularity="channel")
        before = snapshot(model)
        with pytest.raises(dst_prune.DSTError, match=rf"cannot remove the pruned channels of: (.*; )?{layer} \(\d+ "
                                                     rf"pruned channels\) reaches {operation}"):
            dst_prune.export(model, format="shrink")
        assert_unchanged(model, before)

    branching = Branching()
    dst_prune.apply(branching, sparsity=0.5, granularity="channel", dense_stem_and_head=False)
    with pytest.raises(dst_prune.DSTError, match=r"traces the model with torch\.fx .* tracing Branching failed"):
        dst_prune.export(branching, format="shrink")


class Unfollowable(nn.Module):
    """`fc` feeds `head` through one operation that shrink cannot follow."""

    def __init__(self, operation: str) -> None:
        super().__init__()
        self.operation = operation
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.operation == "channels read":
            y = y * y.size(-1)
        elif self.operation == "layer norm":
            y = self.norm(y)
        elif self.operation == "reshape":
            y = y.reshape(-1, 4, 4).transpose(1, 2).reshape(-1, 16)
        else:  # an in-place write into a tensor that is read again
            y = y + F.relu(y, inplace=True)
        return self.head(y)


@pytest.mark.parametrize("operation, reason", [
    ("channels read", r"method size \('size'\): it reads the number of channels"),
    ("layer norm", r"norm \(LayerNorm\): shrink cannot prove that this layer keeps channels apart"),
    ("reshape", r"method reshape \('reshape'\): it reshapes the channels"),
    ("in-place write", r"function relu \('relu'\): it writes in place into 'fc', which other operations read")])
def test_operations_shrink_cannot_follow_are_refused_by_layer(operation, reason):
    torch.manual_seed(0)
    model = Unfollowable(operation)
    dst_prune.apply(model, sparsity=0.5, granularity="channel")
    before = snapshot(model)
    with pytest.raises(dst_prune.DSTError, match=rf"cannot remove the pruned channels of: fc \(8 pruned channels\) "
                                                 rf"reaches {reason}"):
        dst_prune.export(model, format="shrink")
    assert_unchanged(model, before)


@pytest.mark.slow
def test_shrink_benchmark_smoke(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "shrink.py"), "--width", "128", "--cnn-base", "16",
               "--image-size", "16", "--batches", "1", "--sparsities", "0.5", "--repeats", "2", "--threads", "1",
               "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "shrink.json").read_text())
    assert set(report) == {"machine", "commit", "command", "repeats", "threads", "results"}
    rows = report["results"]
    assert {r["model"] for r in rows} == {"mlp", "cnn"}
    for row in rows:
        assert {"params", "dense_params", "flops", "dense_flops", "shrink_ms", "dense_ms", "speedup"} <= set(row)
        assert row["params"] < row["dense_params"] and row["flops"] < row["dense_flops"]
    assert "| shrink" in (tmp_path / "shrink.md").read_text()
