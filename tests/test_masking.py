"""The masking rules of docs/design.md: layout, in-place bool masks, deepcopy, parents that read weights."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from accelerate import Accelerator
from conftest import AttentionNet, CharLSTM, SmallCNN, assert_invariants, small_cnn_batch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.utils import prune

import dst_prune
from dst_prune._masking.hook import DetachMaskedWeights, DSTMask
from dst_prune._masking.readers import ComputeChildWeights, direct_readers
from dst_prune.targets import find_targets


def train_step(model, optimizer, dst, x, y=None):
    out = model(x)
    loss = nn.functional.cross_entropy(out, y) if y is not None else out.float().pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    dst.step()
    return loss


def test_standard_prune_layout_one_method_per_parameter():
    model = SmallCNN()
    dst = dst_prune.apply(model, sparsity=0.8)
    assert prune.is_pruned(model) and dst_prune.is_sparse(model)
    for t in dst.targets:
        module = t.module
        assert isinstance(module._parameters[t.tensor_name + "_orig"], nn.Parameter)
        assert module._buffers[t.tensor_name + "_mask"].dtype == torch.bool
        assert t.tensor_name not in module._parameters
        assert torch.equal(getattr(module, t.tensor_name), t.orig * t.mask)
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
        assert len(hooks) == 1 and isinstance(hooks[0], DSTMask) and hooks[0]._tensor_name == t.tensor_name


def test_masks_are_written_in_place_and_no_hook_accumulates():
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.8, optimizer=optimizer, update_every=1, pruning_threshold=0.05)
    masks = {t.name: (t.mask, t.mask.data_ptr()) for t in dst.targets}
    hook_counts = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    before = [t.mask.clone() for t in dst.targets]
    x, y = small_cnn_batch()
    for _ in range(5):
        train_step(model, optimizer, dst, x, y)
    assert any(not torch.equal(b, t.mask) for b, t in zip(before, dst.targets))  # masks did move
    for t in dst.targets:
        assert t.mask is masks[t.name][0] and t.mask.data_ptr() == masks[t.name][1]
    assert hook_counts == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def test_deepcopy_after_a_training_forward_computes_with_its_own_weights():
    model = SmallCNN()
    dst_prune.apply(model, sparsity=0.8)
    x, _ = small_cnn_batch()
    out = model(x)  # training mode, graph alive
    clone = copy.deepcopy(model)
    out.sum().backward()  # the original's graph is intact
    with torch.no_grad():
        clone.fc1.weight_orig.mul_(2)
    model.eval(), clone.eval()
    assert not torch.allclose(clone(x), model(x))
    with torch.no_grad():
        clone.fc1.weight_orig.div_(2)
    assert torch.allclose(clone(x), model(x))
    assert torch.equal(clone.fc1.weight_mask, model.fc1.weight_mask)
    assert clone.fc1.weight_mask is not model.fc1.weight_mask


def test_timm_model_ema_v3_keeps_bool_masks():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = dst_prune.apply(model, sparsity=0.9, optimizer=optimizer, update_every=1)
    x = torch.randn(2, 3, 32, 32)
    model(x)  # a training forward before the EMA deep-copies the model
    ema = ModelEmaV3(model, decay=0.9)
    dst.add_copy(ema.module)  # the plain state dict ModelEmaV3 lerps holds no masks: the controller sets them
    for _ in range(3):
        train_step(model, optimizer, dst, x)
        ema.update(model)
    for t in dst.targets:
        ema_mask = ema.module.get_buffer(t.name + "_mask")
        assert ema_mask.dtype == torch.bool and torch.equal(ema_mask, t.mask)
        assert not ema.module.get_parameter(t.name + "_orig")[~t.mask].any()
    ema.module.eval()
    ema.module(x)


def test_multihead_attention_masked_entries_have_no_effect():
    torch.manual_seed(0)
    model = AttentionNet()
    dst = dst_prune.apply(model, sparsity=0.7)
    model.eval()
    x = torch.randn(3, 5, 8)
    reference = model(x)
    with torch.no_grad():  # break the invariant on purpose: huge values where the masks are zero
        for t in dst.targets:
            t.orig.masked_fill_(~t.mask, 100.0)
    assert torch.allclose(model(x), reference, atol=1e-6)
    # and the unmasked entries do matter, in_proj and out_proj alike
    for name in ("attn.in_proj_weight", "attn.out_proj.weight"):
        t = next(t for t in dst.targets if t.name == name)
        with torch.no_grad():
            t.orig.mul_(1.5)
        assert not torch.allclose(model(x), reference, atol=1e-4), name
        with torch.no_grad():
            t.orig.div_(1.5)


def test_multihead_attention_trains_every_projection():
    model = AttentionNet()
    dst = dst_prune.apply(model, sparsity=0.7)
    model(torch.randn(3, 5, 8)).sum().backward()
    for t in dst.targets:
        assert t.orig.grad is not None and t.orig.grad[t.mask].abs().sum() > 0, t.name
        assert not t.orig.grad[~t.mask].any()


@pytest.mark.parametrize(("factory", "expected"), [
    (lambda: torchvision.models.swin_t(), {"features.1.0.attn": [("proj", "weight"), ("qkv", "weight")]}),
    (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1,
                                   enable_nested_tensor=False),
     {"layers.0": [("linear1", "weight"), ("linear2", "weight"), ("self_attn", "in_proj_weight"),
                   ("self_attn.out_proj", "weight")]}),
    (lambda: timm.models.eva.Eva(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, qkv_bias=True),
     {"blocks.0.attn": [("qkv", "weight")]}),
])
def test_parents_reading_child_weights_are_found(factory, expected):
    model = factory()
    readers = direct_readers(model, find_targets(model, dense_stem_and_head=False))
    for parent, entries in expected.items():
        assert readers[parent] == entries


def test_multihead_attention_out_proj_gets_a_parent_hook():
    model = AttentionNet()
    dst_prune.apply(model, sparsity=0.5)
    hooks = [h for h in model.attn._forward_pre_hooks.values() if isinstance(h, ComputeChildWeights)]
    assert len(hooks) == 1 and hooks[0].entries == [("out_proj", "weight")]


def test_channels_last_weights():
    model = SmallCNN().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dst = dst_prune.apply(model, sparsity=0.8, optimizer=optimizer, update_every=1, pruning_threshold=0.05)
    assert model.conv.weight_orig.is_contiguous(memory_format=torch.channels_last)
    assert model.conv.weight_mask.is_contiguous(memory_format=torch.channels_last)
    x, y = small_cnn_batch()
    x = x.to(memory_format=torch.channels_last)
    for _ in range(4):
        train_step(model, optimizer, dst, x, y)
        assert_invariants(dst, optimizer)
    assert dst.sparsity == pytest.approx(0.8, abs=1e-4)
    dense = dst_prune.remove(copy.deepcopy(model)).eval()
    assert torch.allclose(model.eval()(x), dense(x), atol=1e-6)


def test_lstm_flat_weights_stay_in_sync():
    model = CharLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = dst_prune.apply(model, sparsity=0.8, optimizer=optimizer, update_every=1, pruning_threshold=0.05)
    tokens = torch.randint(0, 20, (4, 7))
    for _ in range(3):
        out = model(tokens)
        loss = nn.functional.cross_entropy(out.reshape(-1, 20), tokens.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dst.step()
        assert_invariants(dst, optimizer)
    lstm = model.lstm
    for weight, name in zip(lstm._flat_weights, lstm._flat_weights_names):
        assert weight is getattr(lstm, name), name
    copy.deepcopy(model)
    dst_prune.remove(model)
    assert all(isinstance(w, nn.Parameter) for w in lstm._flat_weights)
    assert all(w is getattr(lstm, n) for w, n in zip(lstm._flat_weights, lstm._flat_weights_names))


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "accelerate"])
def test_optimizer_state_zeroed_at_pruned_and_regrown_positions(kind):
    torch.manual_seed(0)
    model = SmallCNN()
    if kind == "accelerate":
        optimizer = Accelerator(cpu=True).prepare_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    else:
        make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
                "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)}[kind]
        optimizer = make(model.parameters())
    dst = dst_prune.apply(model, sparsity=0.8, optimizer=optimizer, update_every=2, pruning_threshold=0.05)
    x, y = small_cnn_batch()
    changed = 0
    for _ in range(6):
        before = [t.mask.clone() for t in dst.targets]
        train_step(model, optimizer, dst, x, y)
        inner = optimizer.optimizer if kind == "accelerate" else optimizer
        for b, t in zip(before, dst.targets):
            moved = b ^ t.mask
            changed += int(moved.sum())
            states = [v for v in inner.state[t.orig].values() if v.shape == t.orig.shape]
            assert len(states) == (1 if kind == "sgd" else 2)
            for state in states:
                assert not state[moved].any(), t.name
            assert not t.orig.detach()[moved & t.mask].any()  # regrown at zero
        assert_invariants(dst, inner)
    assert changed > 0


def test_remove_leaves_plain_parameters_loadable_into_an_untouched_model():
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.8, optimizer=optimizer, update_every=1)
    x, y = small_cnn_batch()
    train_step(model, optimizer, dst, x, y)
    params = {t.name: t.orig for t in dst.targets}
    masks = {t.name: t.mask.clone() for t in dst.targets}
    model.eval()
    reference = model(x)
    assert dst_prune.remove(model) is model
    assert not dst_prune.is_sparse(model) and not prune.is_pruned(model)
    for module in model.modules():
        assert not any(isinstance(h, (DetachMaskedWeights, ComputeChildWeights))
                       for hooks in (module._forward_pre_hooks, module._forward_hooks) for h in hooks.values())
    for name, param in params.items():
        assert model.get_parameter(name) is param  # same Parameter: the optimizer state stays attached
        assert not param.detach()[~masks[name]].any()
    fresh = SmallCNN().eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), reference)
    nn.functional.cross_entropy(model.train()(x), y).backward()
    optimizer.step()  # the optimizer keeps training the now-dense parameters
    with pytest.raises(dst_prune.DSTError, match="were removed"):
        dst.reparameterize()


def test_prune_remove_on_one_parameter_works_and_the_rest_keeps_training():
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst_prune.apply(model, sparsity=0.8, optimizer=optimizer)
    mask = model.conv.weight_mask.clone()
    prune.remove(model.conv, "weight")
    assert isinstance(model.conv._parameters["weight"], nn.Parameter)
    assert not model.conv.weight.detach()[~mask].any()
    x, _ = small_cnn_batch()
    model(x).sum().backward()
    assert isinstance(model.conv._parameters["weight"], nn.Parameter)  # the forward hook left it alone
    assert model.conv.weight.grad is not None and model.fc1.weight_orig.grad is not None


def test_two_forwards_before_one_backward_like_gradient_accumulation():
    torch.manual_seed(0)
    model = SmallCNN()
    dst_prune.apply(model, sparsity=0.8)
    x, y = small_cnn_batch()
    single = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.fc1.weight_orig)[0]
    loss = nn.functional.cross_entropy(model(x), y) + nn.functional.cross_entropy(model(x), y)
    loss.backward()  # the second forward must not have invalidated the first one's saved weights
    assert torch.allclose(model.fc1.weight_orig.grad, 2 * single)


def test_an_evaluation_forward_between_a_forward_and_its_backward():
    model = SmallCNN()
    dst_prune.apply(model, sparsity=0.8)
    x, y = small_cnn_batch()
    loss = nn.functional.cross_entropy(model(x), y)
    with torch.no_grad():
        model.eval()(x)
    model.train()
    loss.backward()
    assert model.conv.weight_orig.grad is not None


def test_the_weight_follows_every_way_weight_orig_can_change():
    model = SmallCNN().eval()
    dst = dst_prune.apply(model, sparsity=0.8)
    x, _ = small_cnn_batch()
    target = dst.targets[0]

    def expected():
        return dst_prune.remove(copy.deepcopy(model))(x)

    model(x)
    with torch.no_grad():
        target.orig.mul_(2)  # in place
    assert torch.equal(model(x), expected())
    target.orig.data = target.orig.data * 0.5  # a new storage
    assert torch.equal(model(x), expected())
    model.load_state_dict({k: v * 3 if k.endswith("_orig") else v for k, v in model.state_dict().items()})
    assert torch.equal(model(x), expected())
    target.mask.masked_fill_(target.mask.clone(), False)  # the mask changes in place
    target.mask.view(-1)[0] = True
    assert torch.equal(model(x), expected())


def test_the_effective_weight_is_weight_orig_masked_in_place_with_no_tensor_of_its_own():
    torch.manual_seed(0)
    model = SmallCNN()
    dst = dst_prune.apply(model, sparsity=0.8)
    x, _ = small_cnn_batch()
    model(x).sum().backward()
    for t in dst.targets:
        weight = getattr(t.module, t.tensor_name)
        assert not isinstance(weight, nn.Parameter) and weight.data_ptr() == t.orig.data_ptr(), t.name
    with torch.no_grad():
        for t in dst.targets:
            t.orig.add_(1.0)  # something (a careless optimizer, user code) writes at masked positions too
    expected = dst_prune.remove(copy.deepcopy(model))(x)
    assert torch.equal(model(x), expected)
    assert all(not t.orig[~t.mask].any() and t.orig[t.mask].ne(0).all() for t in dst.targets)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_second_order_gradients_through_a_masked_weight_equal_those_of_the_explicit_product(layer):
    """`create_graph=True` (Hessian-vector products, MAML): the masked gradient is differentiable."""
    torch.manual_seed(0)
    module = nn.Linear(16, 8) if layer == "linear" else nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 16) if layer == "linear" else torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(module)
    dst_prune.apply(module, sparsity=0.7, dense_stem_and_head=False)
    mask, orig = module.weight_mask, module.weight_orig
    with torch.no_grad():
        reference.weight.copy_(orig)

    def explicit(inputs):
        weight = torch.where(mask, reference.weight, 0.0)
        if layer == "linear":
            return nn.functional.linear(inputs, weight, reference.bias)
        return nn.functional.conv2d(inputs, weight, reference.bias)

    direction = torch.randn_like(orig)
    results = []
    for forward, weight in ((module, orig), (explicit, reference.weight)):
        (grad,) = torch.autograd.grad(forward(x).pow(2).sum(), weight, create_graph=True)
        (hessian_vector,) = torch.autograd.grad((grad * direction).sum(), weight)
        results.append((grad.detach(), hessian_vector))
    torch.testing.assert_close(results[0], results[1])
    assert not results[0][1][~mask].any()
