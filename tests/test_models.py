"""dst_prune's models, and their registration with timm for the training script."""

from __future__ import annotations

import pytest
import timm
import torch

from dst_prune.integrations.models import create_model
from dst_prune.targets import stem_and_head


@pytest.mark.parametrize(("name", "parameters"), [("wrn_28_2", 1_467_610), ("wrn_16_8", 10_961_370),
                                                  ("lenet_300_100", 266_610)])
def test_registered_models_have_the_papers_sizes(name, parameters):
    size = 28 if name == "lenet_300_100" else 32
    chans = 1 if name == "lenet_300_100" else 3
    model = timm.create_model(name, num_classes=10, in_chans=chans, img_size=size)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model(torch.randn(2, chans, size, size)).shape == (2, 10)


def test_wide_resnet_names_its_stem_head_and_shortcuts():
    model = timm.create_model("wrn_28_2")
    assert stem_and_head(model) == ("conv1.weight", ["fc.weight"])
    shortcuts = [n for n, _ in model.named_parameters() if "shortcut" in n]
    assert shortcuts == ["blocks.0.shortcut.weight", "blocks.4.shortcut.weight", "blocks.8.shortcut.weight"]


def test_torchvision_models_by_prefix_and_timm_vits_take_the_image_size():
    assert type(create_model("tv:resnet18", num_classes=7)).__module__.startswith("torchvision")
    vit = create_model("vit_tiny_patch16_224", num_classes=7, img_size=32)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 7)
