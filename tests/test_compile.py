"""torch.compile: a compiled sparse model computes what the eager one does, and mask updates cause no recompile."""

from __future__ import annotations

import pytest
import torch
from conftest import SmallCNN, small_cnn_batch
from torch import nn

import dst_prune


def train_compiled(backend: str, steps: int = 5, tolerance: float = 1e-5):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.8, optimizer=optimizer, update_every=1, pruning_threshold=0.05)
    compiled = torch.compile(model, backend=backend)
    x, y = small_cnn_batch()
    for step in range(steps):
        out = compiled(x)
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), rtol=tolerance, atol=tolerance)
        nn.functional.cross_entropy(out, y).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert dst.step()  # the masks change at every step
        if step == 1:  # warmed up: from here on any recompilation is an error
            torch._dynamo.config.error_on_recompile = True
    torch._dynamo.config.error_on_recompile = False
    return model, dst


def test_compiled_training_matches_eager_without_graph_breaks_or_recompiles():
    from torch._dynamo.utils import counters

    counters.clear()
    _, dst = train_compiled("aot_eager")
    assert counters["stats"]["unique_graphs"] == 1  # the hooks trace: no graph break
    assert sum(sum(r["grown"]) for r in dst.history) > 0
    assert f"{dst.sparsity:.3f}" == "0.800"


def test_compiled_model_gradients_equal_eager_ones():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SmallCNN()
    dst_prune.apply(model, sparsity=0.8)
    x, y = small_cnn_batch()
    nn.functional.cross_entropy(torch.compile(model, backend="aot_eager")(x), y).backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for compiled_grad, param in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(compiled_grad, param.grad)
    assert not model.conv.weight_orig.grad[~model.conv.weight_mask].any()


@pytest.mark.slow
def test_inductor_compiled_sparse_training():
    train_compiled("inductor", steps=4, tolerance=1e-4)  # fused kernels round differently


def test_torch_prunes_form_loads_with_weights_zero_outside_its_masks_so_compiled_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    dst_prune.apply(source, sparsity=0.8, dense_stem_and_head=False)
    state = dst_prune.pruned_state_dict(source)
    for key in [k for k in state if k.endswith("weight_orig")]:  # torch prune keeps values outside the mask
        state[key] = torch.where(state[key.replace("_orig", "_mask")], state[key], torch.randn_like(state[key]))
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    dst = dst_prune.apply(model, sparsity=0.8, dense_stem_and_head=False)
    model.load_state_dict(state)
    assert all(not t.orig.detach()[~t.mask].any() for t in dst.targets)
    x = torch.randn(4, 32)
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager")(x)  # first: nothing eager masked it before
        torch.testing.assert_close(compiled, model(x))
        torch.testing.assert_close(compiled, source(x))


def test_step_inside_a_compiled_function_still_masks_the_weights():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    dst = dst_prune.apply(model, sparsity=0.8, method="static", dense_stem_and_head=False)
    with torch.no_grad():
        for target in dst.targets:
            target.orig.add_(1.0)  # as an optimizer that moves zero weights would

    @torch.compile(backend="eager")
    def step():
        dst.step()

    step()
    assert all(not t.orig.detach()[~t.mask].any() for t in dst.targets)
