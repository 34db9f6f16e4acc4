"""free_gradients=True: every parameter is stepped inside backward and its gradient freed at once, with the same
results as torch's optimizers; loops that need the gradients after backward are refused before anything changes."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from conftest import assert_unchanged, snapshot
from optim_runs import OPTIMIZERS, Run, assert_same, batch, make_model, one_thread, sparse  # noqa: F401
from torch import nn

import dst_prune
import dst_prune.optim
from dst_prune.optim import SpentGradient


def free(name: str):
    make = OPTIMIZERS[name][1]
    return lambda params: make(params, free_gradients=True)


@pytest.mark.parametrize("method", ["rigl", "snfs", "granet", "set", "dsr"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_in_backward_equals_torch_and_growth_still_sees_dense_gradients(method, optimizer):
    """RigL, SNFS and GraNet grow by the dense gradient captured on the recomputed weight: equal masks at every
    update show that it is still captured although `weight_orig.grad` is freed inside backward."""
    reference = Run(OPTIMIZERS[optimizer][0], method).train(8)
    run = Run(free(optimizer), method).train(8)
    assert_same(run, reference)


def test_lr_schedulers_and_a_closure_work_inside_backward():
    def scheduler(optimizer):
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20)

    reference = Run(OPTIMIZERS["adam"][0], "rigl", scheduler=scheduler).train(8)
    run = Run(free("adam"), "rigl", scheduler=scheduler)

    def closure(x, y):
        run.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(run.model(x), y)
        loss.backward()
        return loss

    for step in range(8):  # the closure form (Lightning's): backward runs inside optimizer.step
        run.optimizer.step(functools.partial(closure, *batch(step)))
        run.scheduler.step()
        if run.dst.step():
            run.masks.append([t.mask.clone() for t in run.dst.targets])
    assert_same(run, reference)


def test_at_most_one_gradient_is_alive_and_none_after_backward():
    model = make_model()
    alive = []
    for param in model.parameters():  # registered first, so it runs before the optimizer's hook
        param.register_post_accumulate_grad_hook(
            lambda p: alive.append(sum(q.grad is not None and not isinstance(q.grad, SpentGradient)
                                       for q in model.parameters())))
    optimizer = dst_prune.optim.AdamW(model.parameters(), lr=1e-3, free_gradients=True)
    dst = sparse(model, optimizer, "rigl")
    for step in range(3):
        alive.clear()
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert alive == [1] * 8  # each parameter's own gradient, alone
        assert all(isinstance(p.grad, SpentGradient) for p in model.parameters())
        optimizer.step()
        assert all(p.grad is None for p in model.parameters())
        dst.step()


def _first_backward(optimizer_name: str = "sgd"):
    run = Run(free(optimizer_name), "rigl", named=True)  # named: messages name dense parameters too
    x, y = batch(0)
    before = snapshot(run.model)
    return run, nn.functional.cross_entropy(run.model(x), y), before


def test_clipping_by_global_norm_is_refused_before_anything_changes():
    run, loss, before = _first_backward()
    loss.backward()
    message = "the gradient of 0.bias was already applied and freed (an operation '.device' tried"
    with pytest.raises(dst_prune.DSTError, match=re.escape(message)):
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.zero_grad()
    assert_unchanged(run.model, before)
    assert not run.optimizer.state


def test_grad_scaler_is_refused_before_anything_changes():
    run, loss, before = _first_backward("adamw")
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss).backward()
    with pytest.raises(dst_prune.DSTError, match=re.escape("no torch.amp.GradScaler")):
        scaler.step(run.optimizer)
    run.optimizer.zero_grad()
    assert_unchanged(run.model, before)
    assert not run.optimizer.state


def test_gradient_accumulation_is_refused_at_the_second_backward():
    run, loss, before = _first_backward()
    loss.backward()
    x, y = batch(1)
    with pytest.raises(dst_prune.DSTError, match="free_gradients=True steps each parameter inside backward"):
        nn.functional.cross_entropy(run.model(x), y).backward()
    run.optimizer.zero_grad()
    assert_unchanged(run.model, before)
    # later too (parameters are stepped inside backward by then), also after zero_grad: refused at the second
    # backward's first gradient, before it steps anything
    run.train(2)
    x, y = batch(2)
    nn.functional.cross_entropy(run.model(x), y).backward()
    run.optimizer.zero_grad()
    after_one = snapshot(run.model)
    x, y = batch(3)
    with pytest.raises(dst_prune.DSTError, match=re.escape("a second backward reached 7.bias before optimizer.step()")):
        nn.functional.cross_entropy(run.model(x), y).backward()
    assert_unchanged(run.model, after_one)


def test_reading_a_freed_gradient_names_the_parameter_and_the_conflicts():
    run, loss, _ = _first_backward()
    loss.backward()
    grad = run.model[0].weight_orig.grad
    assert repr(grad) == "SpentGradient('0.weight')"
    with pytest.raises(dst_prune.DSTError, match=r"the gradient of 0.weight was already applied and freed .*"
                                                 r"no clipping by the global norm"):
        grad.norm()


def test_construction_refuses_anything_but_a_bool():
    with pytest.raises(dst_prune.DSTError, match="free_gradients must be True or False; received 1"):
        dst_prune.optim.SGD(make_model().parameters(), lr=0.1, free_gradients=1)


def test_a_parameter_unfrozen_after_construction_is_stepped_at_step():
    def run(make):
        model = make_model()
        model[0].weight.requires_grad_(False)  # frozen when the optimizer is built: no hook
        optimizer = make(model.parameters())
        dst = sparse(model, optimizer, "set", dense_stem_and_head=True)
        model[0].weight.requires_grad_(True)
        for step in range(4):
            x, y = batch(step)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            dst.step()
        return model

    ours, theirs = run(free("sgd")), run(OPTIMIZERS["sgd"][0])
    assert not torch.equal(ours[0].weight, make_model()[0].weight)  # it trained
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
