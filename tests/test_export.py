"""dst_prune.export: inference copies (dense, CSR, 2:4 semi-structured) that compute what the sparse model does."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from conftest import AttentionNet
from torch import nn

import dst_prune
from dst_prune.exporting.formats import CSRLinear


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


@pytest.mark.parametrize("format", ["dense", "csr"])
def test_export_computes_what_the_sparse_model_does_and_leaves_it_alone(format):
    model = mlp()
    dst = dst_prune.apply(model, sparsity=0.95, dense_stem_and_head=False)
    x = torch.randn(7, 64)
    reference = model.eval()(x)
    exported = dst_prune.export(model, format=format)
    torch.testing.assert_close(exported(x), reference, rtol=1e-5, atol=1e-5)
    assert dst_prune.is_sparse(model) and not dst_prune.is_sparse(exported)
    assert not exported.training and not any(p.requires_grad for p in exported.parameters())
    layers = [m for m in exported.modules() if isinstance(m, CSRLinear)]
    if format == "csr":
        assert len(layers) == 3 and all(m.weight.layout == torch.sparse_csr for m in layers)
        assert sum(m.weight._nnz() for m in layers) == dst.budget
    else:
        assert not layers and isinstance(exported[0].weight, nn.Parameter)
    dst.reparameterize()  # the original still trains


def test_csr_export_of_a_vit_keeps_parents_that_read_weights_dense():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    dst_prune.apply(model, sparsity=0.9)
    x = torch.randn(2, 3, 32, 32)
    reference = model.eval()(x)
    exported = dst_prune.export(model, format="csr")
    assert isinstance(exported.blocks[0].attn.qkv, CSRLinear) and isinstance(exported.blocks[0].mlp.fc1, CSRLinear)
    torch.testing.assert_close(exported(x), reference, rtol=1e-4, atol=1e-4)
    attention = AttentionNet()
    dst_prune.apply(attention, sparsity=0.5)
    exported = dst_prune.export(attention, format="csr")
    assert type(exported.attn.out_proj) is not CSRLinear  # nn.MultiheadAttention reads out_proj.weight itself
    torch.testing.assert_close(exported(torch.ones(1, 3, 8)), attention.eval()(torch.ones(1, 3, 8)))


def test_export_refusals():
    with pytest.raises(dst_prune.DSTError, match=re.escape("format='onnx' is unknown; valid choices: dense, csr, "
                                                           "semi_structured")):
        dst_prune.export(mlp(), format="onnx")
    with pytest.raises(dst_prune.DSTError, match="model has no dst_prune masks"):
        dst_prune.export(mlp())
    model = mlp()
    dst_prune.apply(model, sparsity=0.5, granularity="2:4", dense_stem_and_head=False)
    with pytest.raises(dst_prune.DSTError, match=r"0.weight is torch.float32 on cpu: format='semi_structured' needs"):
        dst_prune.export(model, format="semi_structured")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured 2:4 kernels need an NVIDIA GPU")
def test_semi_structured_export_on_gpu():  # pragma: no cover - runs where a GPU is
    model = mlp().half().cuda()
    dst_prune.apply(model, sparsity=0.5, granularity="2:4", dense_stem_and_head=False)
    x = torch.randn(64, 64, device="cuda", dtype=torch.half)
    exported = dst_prune.export(model, format="semi_structured")
    torch.testing.assert_close(exported(x), model.eval()(x), rtol=1e-2, atol=1e-2)
