"""What needs an NVIDIA GPU: 2:4 semi-structured export, and every method's invariants on a CUDA device.

Every test here is marked `gpu` (`pytest -m gpu`) and skips without CUDA. `DST_PRUNE_GPU_TESTS_DEVICE=cpu`
runs the invariant sweep on that device instead (the GPU suite's quick CPU form does, so that these tests keep
working where no GPU is); the 2:4 tests need CUDA whatever it says.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import SmallCNN, assert_invariants, small_cnn_batch
from torch import nn
from torch.sparse import SparseSemiStructuredTensor

import dst_prune

pytestmark = pytest.mark.gpu
DEVICE_VARIABLE = "DST_PRUNE_GPU_TESTS_DEVICE"
HALF = {"float16": (torch.float16, 1e-2), "bfloat16": (torch.bfloat16, 3e-2)}  # dtype, relative tolerance
DYNAMIC = ["set", "dsr", "rigl", "srigl", "snfs", "granet"]  # the methods that move weights
EXTRA = {"dsr": {"pruning_threshold": 0.05}}


@pytest.fixture
def device() -> torch.device:
    """CUDA, or the device named by DST_PRUNE_GPU_TESTS_DEVICE."""
    chosen = os.environ.get(DEVICE_VARIABLE)
    if chosen:
        return torch.device(chosen)
    if not torch.cuda.is_available():
        pytest.skip(f"needs an NVIDIA GPU: CUDA is not available (set {DEVICE_VARIABLE}=cpu to run on the CPU)")
    return torch.device("cuda")


@pytest.fixture
def two_four_device() -> torch.device:
    """A CUDA device with sparse tensor cores (compute capability 8.0+)."""
    if not torch.cuda.is_available():
        pytest.skip("2:4 semi-structured kernels need an NVIDIA GPU: CUDA is not available")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        pytest.skip(f"2:4 semi-structured kernels need compute capability 8.0+; "
                    f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}")
    return torch.device("cuda")


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Close within `tolerance` of the largest expected magnitude (half-precision sums differ in rounding)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype and actual.device == expected.device
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("dtype_name", HALF)
def test_semi_structured_export_computes_what_the_sparse_model_does(two_four_device, dtype_name):
    dtype, tolerance = HALF[dtype_name]
    torch.manual_seed(0)
    # every dimension a multiple of the kernels' smallest tiles (32 rows, 64 columns)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    model = model.to(two_four_device, dtype)
    dst = dst_prune.apply(model, sparsity=0.5, granularity="2:4", dense_stem_and_head=False)
    x = torch.randn(64, 128, device=two_four_device, dtype=dtype)
    tokens = torch.randn(3, 7, 128, device=two_four_device, dtype=dtype)  # 21 rows: padded by the kernels
    with torch.no_grad():
        reference, reference_tokens = model.eval()(x), model(tokens)
    exported = dst_prune.export(model, format="semi_structured")
    weights = [m.weight for m in exported if isinstance(m, nn.Linear)]
    assert len(weights) == 3 and all(isinstance(w, SparseSemiStructuredTensor) for w in weights)
    with torch.inference_mode():
        assert_close_relative(exported(x), reference, tolerance)
        assert_close_relative(exported(tokens), reference_tokens, tolerance)
    assert dst_prune.is_sparse(model) and sum(t.active_groups() for t in dst.targets) == dst.budget


@pytest.mark.parametrize("dtype_name", HALF)
def test_semi_structured_export_of_a_vit(two_four_device, dtype_name):
    import timm

    dtype, tolerance = HALF[dtype_name]
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=64)
    model = model.to(two_four_device, dtype)
    dst_prune.apply(model, sparsity=0.5, granularity="2:4")  # the patch embedding and the head stay dense
    x = torch.randn(4, 3, 32, 32, device=two_four_device, dtype=dtype)
    with torch.no_grad():
        reference = model.eval()(x)
    exported = dst_prune.export(model, format="semi_structured")
    block = exported.blocks[0]
    for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
        assert isinstance(linear.weight, SparseSemiStructuredTensor)
    assert not isinstance(exported.head.weight, SparseSemiStructuredTensor)
    with torch.inference_mode():
        assert_close_relative(exported(x), reference, tolerance)


def _train(model: nn.Module, device: torch.device, method: str, mode: str) -> None:
    """16 steps with an update every 2, checking the invariants of docs/design.md after every step."""
    x, y = (t.to(device) for t in small_cnn_batch(n=8))
    if mode == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    if mode == "bfloat16":
        x = x.to(torch.bfloat16)
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-2) if mode in ("float32", "bf16-autocast") else
                 torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True))
    dst = dst_prune.apply(model, sparsity=0.8, method=method, optimizer=optimizer, update_every=2, total_steps=16,
                          init="random", **EXTRA.get(method, {}))
    moved = 0
    for _ in range(16):
        before = [t.mask.clone() for t in dst.targets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dst.step()
        assert_invariants(dst, optimizer)
        for old, t in zip(before, dst.targets):
            assert t.mask.device.type == t.orig.device.type == device.type, f"{t.name}: mask left the device"
            grown = t.mask & ~old
            moved += int(grown.sum())
            assert not t.orig.detach()[grown].any(), f"{t.name}: regrown weight not zero"
            for state in optimizer.state[t.orig].values():
                if isinstance(state, torch.Tensor) and state.shape == t.orig.shape:
                    assert not state[grown].any(), f"{t.name}: regrown weight has optimizer state"
    assert dst.budget == round(0.2 * dst.n_sparse)
    assert sum(t.active_groups() for t in dst.targets) == dst.budget
    if method in DYNAMIC:
        assert moved > 0, "no weight was ever reallocated: the test would not catch anything"
    assert torch.isfinite(loss)


@pytest.mark.parametrize("mode", ["float32", "bf16-autocast", "channels-last", "bfloat16"])
@pytest.mark.parametrize("method", dst_prune.list_methods())
def test_every_method_keeps_the_invariants_on_the_device(device, method, mode):
    torch.manual_seed(0)
    model = SmallCNN().to(device)
    if mode == "channels-last":
        model = model.to(memory_format=torch.channels_last)
    if mode == "bfloat16":
        model = model.to(torch.bfloat16)
    _train(model, device, method, mode)
    if mode == "channels-last":
        assert model.conv.weight_orig.is_contiguous(memory_format=torch.channels_last)
        assert model.conv.weight_mask.is_contiguous(memory_format=torch.channels_last)
    if mode == "bfloat16":
        assert model.conv.weight_orig.dtype == torch.bfloat16 and model.conv.weight_mask.dtype == torch.bool
