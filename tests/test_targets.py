"""Which parameters become sparse: default layer types, stem and head, include/exclude, frozen ones."""

from __future__ import annotations

import timm
import torch
import torchvision
from conftest import AttentionNet, CharLSTM, SmallCNN
from torch import nn

import dst_prune
from dst_prune.targets import find_targets, stem_and_head


def names(model, **kwargs):
    return [t.name for t in find_targets(model, **kwargs)]


def test_small_cnn_defaults_cover_grouped_depthwise_and_transposed_convs():
    assert names(SmallCNN()) == ["conv.weight", "depthwise.weight", "up.weight", "fc1.weight"]
    assert names(SmallCNN(), dense_stem_and_head=False) == [
        "stem.weight", "conv.weight", "depthwise.weight", "up.weight", "fc1.weight", "head.weight"]


def test_timm_resnet_stem_and_head_come_from_pretrained_cfg():
    model = timm.create_model("resnet18", pretrained=False)
    assert stem_and_head(model) == ("conv1.weight", ["fc.weight"])
    chosen = names(model)
    convs = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert chosen == convs[1:]  # every conv but the stem; no BN, no bias, no fc


def test_torchvision_resnet_falls_back_to_first_conv_and_last_linear():
    model = torchvision.models.resnet18()
    assert stem_and_head(model) == ("conv1.weight", ["fc.weight"])


def test_timm_distilled_vit_keeps_both_heads_dense():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32)
    stem, heads = stem_and_head(model)
    assert stem == "patch_embed.proj.weight" and heads == ["head.weight", "head_dist.weight"]
    chosen = names(model)
    assert "head.weight" not in chosen and "head_dist.weight" not in chosen
    assert "blocks.0.attn.qkv.weight" in chosen and "blocks.11.mlp.fc2.weight" in chosen


def test_torchvision_vit_sparsifies_multihead_attention_projections():
    model = torchvision.models.vit_b_16(image_size=32)
    chosen = names(model)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in chosen
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in chosen
    assert "conv_proj.weight" not in chosen and "heads.head.weight" not in chosen
    assert not any("ln" in n or n.endswith("bias") or "pos_embedding" in n for n in chosen)


def test_multihead_attention_with_separate_kv_dims_uses_q_k_v_projections():
    attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert names(attn, dense_stem_and_head=False) == [
        "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_lstm_weights_not_biases_nor_embeddings():
    assert names(CharLSTM()) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1"]
    bidirectional = nn.LSTM(4, 4, bidirectional=True, proj_size=2)
    assert names(bidirectional) == ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0", "weight_ih_l0_reverse",
                                    "weight_hh_l0_reverse", "weight_hr_l0_reverse"]
    cell = nn.GRUCell(4, 4)
    assert names(cell) == ["weight_ih", "weight_hh"]


def test_include_regex_replaces_the_default_and_can_name_any_parameter():
    assert names(SmallCNN(), include=r"(stem|head)\.(weight|bias)") == [
        "stem.weight", "stem.bias", "head.weight", "head.bias"]


def test_include_list_matches_full_names_and_dot_suffixes():
    model = timm.create_model("resnet18", pretrained=False)
    assert names(model, include=["downsample.0.weight"]) == ["layer2.0.downsample.0.weight",
                                                             "layer3.0.downsample.0.weight",
                                                             "layer4.0.downsample.0.weight"]
    assert names(model, include=["layer1.0.conv1.weight", "fc.weight"]) == ["layer1.0.conv1.weight", "fc.weight"]
    # a suffix must follow a dot: "conv1.weight" does not match "layer1.0.xconv1.weight"-like names,
    # but does match the stem "conv1.weight" and every block's conv1
    assert names(model, include=["conv1.weight"])[0] == "conv1.weight"


def test_exclude_applies_after_the_default_selection():
    model = timm.create_model("resnet18", pretrained=False)
    chosen = names(model, exclude=["downsample.0.weight"])  # the DSR paper keeps the 1x1 shortcuts dense
    assert not any("downsample" in n for n in chosen) and "layer1.0.conv1.weight" in chosen
    assert names(model, exclude=r"layer[234]\..*") == [
        "layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv1.weight", "layer1.1.conv2.weight"]


def test_frozen_parameters_are_skipped():
    model = SmallCNN()
    model.conv.weight.requires_grad_(False)
    assert "conv.weight" not in names(model)


def test_stem_is_none_without_conv_and_head_is_the_last_linear():
    assert stem_and_head(AttentionNet()) == (None, ["head.weight"])
    assert names(AttentionNet()) == ["proj.weight", "attn.in_proj_weight", "attn.out_proj.weight"]


def test_apply_reports_the_same_targets():
    model = SmallCNN()
    dst = dst_prune.apply(model, sparsity=0.5)
    assert [n for n, _ in dst.named_sparse_parameters()] == names(SmallCNN())
    assert all(p is model.get_parameter(n + "_orig") for n, p in dst.named_sparse_parameters())
    assert list(dst.sparse_parameters()) == [p for _, p in dst.named_sparse_parameters()]
    assert all(isinstance(p, torch.nn.Parameter) for p in dst.sparse_parameters())
