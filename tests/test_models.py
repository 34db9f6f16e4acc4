"""dst_prune's models, and their registration with timm for the training script."""

from __future__ import annotations

import pytest
import timm
import torch

from dst_prune.targets import stem_and_head
from dst_prune.training.models import create_model, register_timm_models


@pytest.fixture(autouse=True)
def _registered():
    register_timm_models()


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


def test_every_seed_model_is_registered_with_timm():
    from dst_prune.training.timm_models import MODELS, register_timm_models

    assert register_timm_models() == MODELS and register_timm_models() == MODELS  # (twice: no duplicate)
    assert set(MODELS) <= set(timm.list_models())
    lstm = timm.create_model("char_lstm", vocab_size=65)
    logits, _ = lstm(torch.randint(0, 65, (2, 7)))
    assert logits.shape == (2, 7, 65)
    assert sum(p.numel() for p in timm.create_model("i1k_resnet50").parameters()) == 25_557_032
    sb = timm.create_model("cifar_resnet56", sb_mode="dynamic", sb_q=3)
    assert sb(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_data_root_from_the_environment_or_a_dotenv_file(tmp_path, monkeypatch):
    from dst_prune.training.data import resolve_data_root

    monkeypatch.delenv("DATAPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_root() is None
    (tmp_path / ".env").write_text("OTHER=1\nDATAPATH='/data/sets'\n")
    assert str(resolve_data_root()) == "/data/sets"
    monkeypatch.setenv("DATAPATH", "/elsewhere")
    assert str(resolve_data_root()) == "/elsewhere" and str(resolve_data_root("/explicit")) == "/explicit"
