"""The exported sparse layers run small products on one thread (a multi-threaded sparse product collapses on a
machine whose cores are shared) and leave torch's thread setting as they found it."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import dst_prune
from dst_prune import _threads
from dst_prune.exporting.formats import CSRLinear


@pytest.fixture
def two_threads():
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def threads_seen(target: object, name: str):
    """Patch `target.name` to record `torch.get_num_threads()` at each call (and then run it)."""
    original, seen = getattr(target, name), []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)
    return mock.patch.object(target, name, recording), seen


def sparse_mlp(method: str = "static", granularity: str = "1:4") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    dst_prune.apply(model, sparsity=0.75, method=method, granularity=granularity, dense_stem_and_head=False)
    return model


def test_a_batch_one_condensed_product_runs_on_one_thread_and_restores_the_setting(two_threads):
    model = sparse_mlp()
    exported, dense = dst_prune.export(model, format="condensed"), dst_prune.export(model, format="dense")
    x = torch.randn(1, 64)
    patch, seen = threads_seen(torch, "addmv")
    with patch, torch.inference_mode():
        out = exported(x)
    assert seen == [1, 1] and torch.get_num_threads() == 2
    torch.testing.assert_close(out, dense(x))


def test_a_batch_one_csr_product_runs_on_one_thread(two_threads):
    exported = dst_prune.export(sparse_mlp(granularity="element"), format="csr")
    assert isinstance(exported[0], CSRLinear) and isinstance(exported[2], CSRLinear)
    patch, seen = threads_seen(torch, "addmv")
    with patch, torch.inference_mode():
        out = exported(torch.randn(1, 64))
    assert seen == [1, 1] and torch.get_num_threads() == 2
    assert out.shape == (1, 8)


def test_large_products_keep_the_threads_and_a_failing_product_restores_them(two_threads):
    with _threads.threads_for(2 * _threads.GRAIN, torch.device("cpu")):
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"), _threads.threads_for(10, torch.device("cpu")):
        assert torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with _threads.threads_for(10, torch.device("meta")):  # other devices: untouched
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bias", [True, False])
def test_csr_layers_hold_int32_indices_and_compute_the_dense_product_at_any_batch(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=bias), nn.ReLU(), nn.Linear(48, 8, bias=bias))
    dst_prune.apply(model, sparsity=0.8, dense_stem_and_head=False)
    csr, dense = dst_prune.export(model, format="csr"), dst_prune.export(model, format="dense")
    assert all(m.weight.crow_indices().dtype == torch.int32 == m.weight.col_indices().dtype
               for m in csr.modules() if isinstance(m, CSRLinear))
    with torch.inference_mode():
        for shape in [(1, 64), (64,), (5, 64), (2, 3, 64)]:
            x = torch.randn(shape)
            torch.testing.assert_close(csr(x), dense(x), rtol=1e-5, atol=1e-5)
