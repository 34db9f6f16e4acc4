"""dst_prune.export: inference copies (dense, CSR, 2:4 semi-structured) that compute what the sparse model does."""

from __future__ import annotations

import logging
import re

import pytest
import timm
import torch
from conftest import AttentionNet, assert_unchanged, snapshot
from torch import nn

import dst_prune
from dst_prune.exporting.formats import CSRLinear

GPT2_LAYERS = {f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                           "mlp.c_proj")}


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


def gpt2() -> nn.Module:
    """A tiny GPT-2: its attention and MLP layers are transformers' Conv1D (weight stored input x output)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_csr_export_of_gpt2_converts_its_conv1d_layers():
    model = gpt2()
    dst = dst_prune.apply(model, sparsity=0.9)
    assert {name.rpartition(".")[0] for name in dst.masks()} == GPT2_LAYERS
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = model(tokens).logits
    before = snapshot(model)
    exported = dst_prune.export(model, format="csr")
    assert_unchanged(model, before)
    converted = {name: m for name, m in exported.named_modules() if isinstance(m, CSRLinear)}
    assert set(converted) == GPT2_LAYERS and sum(m.weight._nnz() for m in converted.values()) == dst.budget
    attention = converted["transformer.h.0.attn.c_attn"]
    assert (attention.in_features, attention.out_features) == (64, 192)  # Conv1D(nf=192, nx=64): weight [64, 192]
    assert torch.equal(attention.weight.to_dense(), model.transformer.h[0].attn.c_attn.weight.detach().T)
    torch.testing.assert_close(exported(tokens).logits, reference, rtol=1e-5, atol=1e-5)


def test_semi_structured_export_of_gpt2_checks_its_conv1d_layers_on_cpu():
    two_four = gpt2()
    dst_prune.apply(two_four, sparsity=0.5, granularity="2:4")  # 2:4 along Conv1D's input dimension (its rows)
    with pytest.raises(dst_prune.DSTError, match=r"transformer\.h\.0\.attn\.c_attn\.weight is torch\.float32 on cpu: "
                                                 r"format='semi_structured' needs float16 or bfloat16"):
        dst_prune.export(two_four, format="semi_structured")
    unstructured = gpt2()
    dst_prune.apply(unstructured, sparsity=0.5)
    with pytest.raises(dst_prune.DSTError, match=r"transformer\.h\.0\.attn\.c_attn\.weight is not 2:4 sparse"):
        dst_prune.export(unstructured, format="semi_structured")


def test_csr_export_names_the_sparse_tensors_it_leaves_dense(caplog):
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    dst_prune.apply(convs, sparsity=0.5)  # stem and head dense: only the middle conv is sparse
    before = snapshot(convs)
    with pytest.raises(dst_prune.DSTError, match=r"format='csr' found no sparse layer to convert \(2\.weight: a Conv2d "
                                                 r"tensor \(only nn\.Linear and transformers' Conv1D weights"):
        dst_prune.export(convs, format="csr")
    assert_unchanged(convs, before)
    mixed = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
                          nn.ReLU(), nn.Linear(16, 4))
    dst_prune.apply(mixed, sparsity=0.5)
    with caplog.at_level(logging.WARNING, logger="dst_prune"):
        exported = dst_prune.export(mixed, format="csr")
    assert isinstance(exported[4], CSRLinear) and type(exported[2]) is nn.Conv2d
    assert re.search(r"format='csr' converts 1 sparse layers and leaves 1 sparse tensors dense: 2\.weight: a Conv2d",
                     caplog.text)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(exported(x), mixed.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured 2:4 kernels need an NVIDIA GPU of compute capability 8.0+")
def test_semi_structured_export_of_gpt2_on_gpu():  # pragma: no cover - runs where a GPU is
    model = gpt2().half().cuda()
    dst_prune.apply(model, sparsity=0.5, granularity="2:4")
    tokens = torch.randint(0, 100, (4, 16), device="cuda")
    exported = dst_prune.export(model, format="semi_structured")
    layer = exported.transformer.h[0].attn.c_attn
    assert type(layer) is nn.Linear and type(layer.weight.data).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(exported(tokens).logits, model(tokens).logits, rtol=1e-2, atol=1e-2)
