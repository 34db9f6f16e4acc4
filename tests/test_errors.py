"""Every bad input gets a clear DSTError naming the argument or parameter, and leaves the model untouched."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from conftest import CharLSTM, SmallCNN, assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import parametrizations, prune

import dst_prune
from dst_prune._masking import attach as attaching


def refused(model, message, sparse_before=False, **kwargs):
    """Apply with `kwargs`, expect a DSTError matching `message`, and check the model did not change."""
    before = snapshot(model) if isinstance(model, nn.Module) else None
    with pytest.raises(dst_prune.DSTError, match=re.escape(message)) as error:
        dst_prune.apply(model, **{"sparsity": 0.9, **kwargs})
    if before is not None:
        assert_unchanged(model, before)
        assert dst_prune.is_sparse(model) == sparse_before
    return str(error.value)


def test_dsterror_is_a_valueerror():
    assert issubclass(dst_prune.DSTError, ValueError)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "0.9", True, None])
def test_sparsity_outside_unit_interval(sparsity):
    refused(SmallCNN(), f"sparsity must be a number in [0, 1); received {sparsity!r}", sparsity=sparsity)


def test_unknown_method_lists_the_valid_ones():
    refused(SmallCNN(), "method='rigl2' is unknown; valid choices: static, set, dsr, rigl, srigl, snfs, gmp, granet.",
            method="rigl2")


def test_unknown_distribution_lists_the_valid_ones():
    refused(SmallCNN(), "distribution='erdos' is unknown; valid choices: uniform, er, erk, global",
            distribution="erdos")


def test_unknown_init_lists_the_valid_ones():
    refused(SmallCNN(), "init='zeros' is unknown; valid choices: magnitude, random", init="zeros")


def test_unknown_hyperparameter_lists_the_valid_ones():
    refused(SmallCNN(), "method='dsr' has no hyperparameter 'drop_fraction'; valid ones: target_fraction_to_prune, "
                        "pruning_threshold, delta", drop_fraction=0.3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"update_every": 0}, "update_every must be a positive integer"),
    ({"update_every": 2.5}, "update_every must be a positive integer"),
    ({"stop_step": -3}, "stop_step must be a positive integer"),
    ({"seed": -1}, "seed must be a non-negative integer; received -1"),
    ({"total_steps": 0}, "total_steps must be None or a positive integer; received 0"),
    ({"optimizer": "sgd"}, "optimizer must be a torch.optim.Optimizer (or a wrapper of one, such as accelerate's); "
                           "received str"),
    ({"dense_stem_and_head": "yes"}, "dense_stem_and_head must be True or False; received 'yes'"),
])
def test_bad_scalar_arguments(kwargs, message):
    refused(SmallCNN(), message, **kwargs)


def test_not_a_module():
    refused(object(), "model must be a torch.nn.Module; received object")


def test_include_matching_nothing_lists_close_names():
    text = refused(SmallCNN(), "include entry 'fc.wieght' matches no", include=["fc.wieght"])
    assert "fc1.weight" in text


def test_include_regex_matching_nothing():
    pattern = r"layer\d+\.conv\.weight"
    text = refused(SmallCNN(), f"include entry '{pattern}' matches no", include=pattern)
    assert "Close names" in text or "Parameters look like" in text


def test_exclude_matching_nothing_lists_close_names():
    text = refused(SmallCNN(), "exclude entry 'depthwise.weights' matches no", exclude=["depthwise.weights"])
    assert "depthwise.weight" in text


def test_invalid_regex():
    refused(SmallCNN(), "include='conv[' is not a valid regular expression", include="conv[")


def test_bad_include_type():
    refused(SmallCNN(), "include must be None, a regex string or a list of parameter names; received int", include=3)


def test_nothing_to_sparsify():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    refused(model, "Nothing to sparsify: no trainable parameter of the model was selected")


def test_everything_frozen_says_so():
    model = SmallCNN()
    model.requires_grad_(False)
    refused(model, "matching parameters are frozen: requires_grad=False")


def test_already_pruned_parameter():
    model = SmallCNN()
    prune.l1_unstructured(model.conv, "weight", amount=0.5)
    refused(model, "conv.weight is already pruned by torch.nn.utils.prune. Call dst_prune.remove(model)")


def test_already_sparse_model():
    model = SmallCNN()
    dst_prune.apply(model, sparsity=0.5)
    refused(model, "model is already sparse (dst_prune masks are attached)", sparse_before=True)


def test_tied_weights_name_both():
    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    tied[2].weight = tied[0].weight
    text = refused(tied, "is tied: the same tensor is the parameter 0.weight and 2.weight")
    assert "exclude=" in text


def test_tied_embedding_and_head_is_dense_by_default_and_refused_when_included():
    model = CharLSTM()
    model.decoder.weight = model.embed.weight  # weight tying (Press & Wolf 2017); decoder is the head
    dst = dst_prune.apply(model, sparsity=0.5)  # the head stays dense, so the tie is harmless
    assert "decoder.weight" not in [t.name for t in dst.targets]
    dst_prune.remove(model)
    refused(model, "decoder.weight is tied: the same tensor is the parameter decoder.weight and embed.weight",
            dense_stem_and_head=False)


def test_meta_device_parameters():
    with torch.device("meta"):
        model = SmallCNN()
    refused(model, "is on the meta device and holds no values")


def test_parametrized_parameter():
    model = SmallCNN()
    parametrizations.weight_norm(model.fc1)
    refused(model, "fc1.weight is parametrized (torch.nn.utils.parametrize)")
    refused(model, "fc1.weight is parametrized (torch.nn.utils.parametrize)", include=["fc1.weight"])


def test_lazy_parameter():
    model = nn.Sequential(nn.LazyLinear(8), nn.Linear(8, 2))
    refused(model, "0.weight is an uninitialized lazy parameter", dense_stem_and_head=False)


def test_layer_left_without_weights():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(100, 100))
    refused(model, "sparsity=0.99 with distribution='uniform' would leave 0.weight (and 0 more) with no active "
                   "weight", sparsity=0.99, dense_stem_and_head=False)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_module():
    refused(torch.jit.script(nn.Linear(4, 4)), "model is a TorchScript module")


def test_failure_while_attaching_restores_the_model_exactly(monkeypatch):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    before = snapshot(model)
    calls = {"n": 0}
    real_attach = attaching.attach

    def failing_attach(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure")
        return real_attach(*args, **kwargs)

    monkeypatch.setattr("dst_prune._attach.attach", failing_attach)
    with pytest.raises(RuntimeError, match="simulated failure"):
        dst_prune.apply(model, sparsity=0.9)
    assert_unchanged(model, before)
    assert not prune.is_pruned(model)


def test_failure_while_attaching_an_lstm_restores_its_flat_weights(monkeypatch):
    model = CharLSTM()
    before = snapshot(model)
    real_attach = attaching.attach
    calls = {"n": 0}

    def failing_attach(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        return real_attach(*args, **kwargs)

    monkeypatch.setattr("dst_prune._attach.attach", failing_attach)
    with pytest.raises(RuntimeError):
        dst_prune.apply(model, sparsity=0.5)
    assert_unchanged(model, before)
    names = model.lstm._flat_weights_names
    assert all(w is getattr(model.lstm, n) for w, n in zip(model.lstm._flat_weights, names))
    model(torch.randint(0, 20, (2, 5))).sum().backward()
