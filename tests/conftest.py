"""Shared factories and checks for the dst_prune tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import dst_prune

# Tiny models run several times faster on one thread than on two on a busy machine; tests of large models ask
# for more with @pytest.mark.threads(n) (capped by the cores there are).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _torch_threads(request):
    marker = request.node.get_closest_marker("threads")
    if marker is None:
        yield
        return
    torch.set_num_threads(max(1, min(int(marker.args[0]), os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(1)


# --- tiny models ------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Stem conv, a grouped conv, a depthwise conv, a transposed conv and two linears."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.up = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = torch.relu(self.bn(self.up(self.depthwise(x))))
        x = x.mean((2, 3))
        return self.head(torch.relu(self.fc1(x)))


class CharLSTM(nn.Module):
    """A 2-layer character LSTM language model (embedding, LSTM, decoder)."""

    def __init__(self, vocab: int = 20, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, hidden, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.decoder(out)


class AttentionNet(nn.Module):
    """A linear embedding, an nn.MultiheadAttention and a head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(8, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def small_cnn_batch(n: int = 4, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


# --- checks -------------------------------------------------------------------------------------
def _value(tensor: torch.Tensor) -> torch.Tensor | None:
    """A copy of the values; None for tensors without values (meta, lazy)."""
    if tensor.is_meta or isinstance(tensor, nn.parameter.UninitializedTensorMixin):
        return None
    return tensor.detach().clone()


def snapshot(model: nn.Module) -> dict:
    """Everything `apply` could change: tensors (values, dtype, layout), names, hooks and attributes."""
    return {
        "state": {k: (_value(v), v.dtype, None if _value(v) is None else v.stride())
                  for k, v in model.state_dict(keep_vars=True).items()},
        "parameters": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [n for n, _ in model.named_buffers()],
        "hooks": [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()],
        "attributes": [(n, sorted(m.__dict__)) for n, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("parameters", "buffers", "hooks", "attributes"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, (value, dtype, stride) in before["state"].items():
        new_value, new_dtype, new_stride = after["state"][k]
        assert new_dtype == dtype and new_stride == stride, k
        assert (new_value is None and value is None) or torch.equal(new_value, value) or (
            value.is_floating_point() and torch.equal(new_value.isnan(), value.isnan())
            and torch.equal(new_value.nan_to_num(), value.nan_to_num())), k  # NaN equals NaN here


def assert_invariants(dst: dst_prune.DynamicSparsity, optimizer: torch.optim.Optimizer | None = None) -> None:
    """the invariants of docs/design.md: exact count, bool masks, zeros where masked in weights, grads and state."""
    assert sum(t.active_groups() for t in dst.targets) == dst.budget
    for t in dst.targets:
        mask, orig = t.mask, t.orig
        assert mask.dtype == torch.bool and mask.shape == orig.shape
        effective = getattr(t.module, t.tensor_name)
        assert not effective[~mask].any(), f"{t.name}: effective weight non-zero where masked"
        assert not orig.detach()[~mask].any(), f"{t.name}: weight_orig non-zero where masked"
        if orig.grad is not None:
            assert not orig.grad[~mask].any(), f"{t.name}: gradient non-zero where masked"
        if optimizer is not None:
            for value in optimizer.state.get(orig, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == orig.shape:
                    assert not value[~mask].any(), f"{t.name}: optimizer state non-zero where masked"


@pytest.fixture
def datapath() -> Path:
    """The real datasets (../shared/data); tests that need them skip when it is not set."""
    root = os.environ.get("DATAPATH")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        pytest.skip("real data not available: set DATAPATH to the folder holding MNIST/raw (../shared/data)")
    return Path(root).resolve()
