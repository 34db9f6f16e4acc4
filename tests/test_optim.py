"""dst_prune.optim: compact optimizer state equals torch's optimizers on the same masked model, for every method
and granularity, and survives mask changes, undone updates, checkpoints and `dst_prune.remove`."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from optim_runs import OPTIMIZERS, Run, assert_same, batch, make_model, moved, one_thread, resumed_from, sparse  # noqa: F401
from torch import nn

import dst_prune
import dst_prune.optim
from dst_prune.optim.layout import remap

GRANULARITIES = ["element", "channel", "kernel", "2:4"]
CASES = [(m, g) for m in dst_prune.list_methods() for g in GRANULARITIES
         if not (m == "srigl" and g != "element") and not (m in ("gmp", "granet") and g == "2:4")]


@pytest.mark.parametrize(("method", "granularity"), CASES)
def test_every_method_and_granularity_trains_as_torch_does(method, granularity):
    for name, (theirs, ours) in OPTIMIZERS.items():
        reference = Run(theirs, method, granularity).train(8)
        compact = Run(ours, method, granularity).train(8)
        assert_same(compact, reference)
        if method not in ("static", "gmp"):
            assert moved(reference) > 0, "no weight moved: the comparison would not see a remap"
        theirs_count, ours_count = (sum(v.numel() for s in r.optimizer.state.values() for k, v in s.items()
                                        if k not in ("step", "active_indices")) for r in (reference, compact))
        assert ours_count < theirs_count, name  # (sgd_dampened's first step makes its buffers)


def test_sparse_state_is_one_dimensional_over_the_active_weights_with_int32_positions():
    run = Run(OPTIMIZERS["adamw"][1], "set").train(3)
    for target in run.dst.targets:
        state = run.optimizer.state[target.param]
        positions = state["active_indices"]
        assert positions.dtype == torch.int32
        assert torch.equal(positions.long(), target.mask.reshape(-1).nonzero().view(-1))
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (target.active(),)
    head_bias = run.model[7].bias
    assert run.optimizer.state[head_bias]["exp_avg"].shape == head_bias.shape  # dense parameters: dense state
    assert sorted(run.optimizer.sparse_parameter_names()) == ["0.weight", "2.weight", "5.weight", "7.weight"]


def test_remap_keeps_survivors_drops_pruned_and_starts_grown_at_zero():
    old = torch.tensor([1, 4, 6, 9], dtype=torch.int32)
    new = torch.tensor([0, 4, 7, 9], dtype=torch.int32)
    values = torch.tensor([10.0, 40.0, 60.0, 90.0])
    assert remap(values, old, new).tolist() == [0.0, 40.0, 0.0, 90.0]
    assert remap(values, old[:0], new).tolist() == [0.0] * 4


def test_state_follows_a_mask_change_exactly():
    model = nn.Linear(6, 4, bias=False)
    optimizer = dst_prune.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.5, method="set", optimizer=optimizer, update_every=1,
                          dense_stem_and_head=False, drop_fraction=0.5)
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    before_mask = model.weight_mask.clone()
    before = dict(zip(optimizer.state[model.weight_orig]["active_indices"].tolist(),
                      optimizer.state[model.weight_orig]["momentum_buffer"].tolist()))
    optimizer.zero_grad()
    assert dst.step()
    mask = model.weight_mask.reshape(-1)
    model(torch.randn(3, 6)).sum().backward()
    grad = model.weight_orig.grad.reshape(-1).clone()
    optimizer.step()
    state = optimizer.state[model.weight_orig]
    assert torch.equal(state["active_indices"].long(), mask.nonzero().view(-1))
    grown = (mask & ~before_mask.reshape(-1)).nonzero().view(-1).tolist()
    assert grown, "the update grew nothing"
    for position, momentum in zip(state["active_indices"].tolist(), state["momentum_buffer"].tolist()):
        expected = 0.9 * before.get(position, 0.0) + grad[position].item()  # grown: zero momentum
        assert momentum == pytest.approx(expected, rel=1e-6), position


def test_a_weight_pruned_and_regrown_in_one_update_restarts_its_state_as_with_torch():
    """GraNet prunes by magnitude, then regrows by gradient: a weight can go and come back in one update, which
    leaves its mask entry as it was. The controller zeroed it and torch's state; the compact state must too."""
    reference = Run(OPTIMIZERS["adam"][0], "granet").train(3)
    run = Run(OPTIMIZERS["adam"][1], "granet").train(3)
    assert_same(run, reference)


def test_an_undone_update_leaves_the_state_as_it_was(monkeypatch):
    reference = Run(OPTIMIZERS["adam"][0], "rigl").train(3)
    run = Run(OPTIMIZERS["adam"][1], "rigl").train(3)
    states = {k: {n: v.clone() for n, v in s.items()} for k, s in run.optimizer.state.items()}
    algorithm = type(run.dst.algorithm)
    original = algorithm.exchange

    def fail_halfway(self, fraction):
        original(self, fraction)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(algorithm, "exchange", fail_halfway)
    for r in (run, reference):  # the same failed update on both
        x, y = batch(3)
        nn.functional.cross_entropy(r.model(x), y).backward()
        with pytest.raises(RuntimeError, match="interrupted"):
            r.dst.reparameterize()  # changes masks, then undoes them all
        r.optimizer.zero_grad()
    monkeypatch.setattr(algorithm, "exchange", original)
    for param, state in run.optimizer.state.items():
        for key, value in state.items():
            assert torch.equal(value, states[param][key]), key
    run.train(5)
    reference.train(5)
    assert_same(run, reference)


@pytest.mark.parametrize("free_gradients", [False, True])
def test_resume_from_a_weights_only_checkpoint_is_bitwise(free_gradients):
    def make(p):
        return dst_prune.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True, free_gradients=free_gradients)

    straight = Run(make, "rigl").train(9)
    first = Run(make, "rigl").train(5)  # stops right after an update (step 4) and one step more
    resumed = resumed_from(first, make, "rigl")
    state = resumed.optimizer.state[resumed.dst.targets[0].param]
    assert state["active_indices"].dtype == torch.int32  # not cast to the parameter's dtype
    resumed.train(4)
    assert_same(resumed, straight, exact=True)


def test_a_checkpoint_taken_between_update_and_next_step_resumes_bitwise():
    straight = Run(OPTIMIZERS["sgd"][1], "set").train(8)
    first = Run(OPTIMIZERS["sgd"][1], "set").train(4)  # the update of step 4 changed masks; no remap yet
    resumed = resumed_from(first, OPTIMIZERS["sgd"][1], "set")
    resumed.train(4)
    assert_same(resumed, straight, exact=True)


def test_a_state_dict_of_torchs_optimizer_is_compacted_and_training_continues_as_torch():
    reference = Run(OPTIMIZERS["adamw"][0], "set").train(3)
    state = copy.deepcopy(reference.optimizer.state_dict())  # (a state dict shares the live tensors)
    continued = Run(OPTIMIZERS["adamw"][1], "set")
    continued.model.load_state_dict(reference.model.state_dict())
    continued.dst.load_state_dict(reference.dst.state_dict())
    continued.optimizer.load_state_dict(state)
    continued.step_index = 3
    continued.train(5)
    reference.train(5)
    continued.masks = reference.masks[:1] + continued.masks
    assert_same(continued, reference)
    target = continued.dst.targets[0]
    assert continued.optimizer.state[target.param]["exp_avg"].shape == (target.active(),)


def test_an_inconsistent_checkpoint_is_refused_and_changes_nothing():
    run = Run(OPTIMIZERS["adam"][1], "set").train(3)
    state = run.optimizer.state_dict()
    before = {k: {n: v.clone() for n, v in s.items()} for k, s in run.optimizer.state.items()}
    tampered = {**state, "state": {k: dict(v) for k, v in state["state"].items()}}
    tampered["state"][0]["exp_avg"] = tampered["state"][0]["exp_avg"][:-1]
    with pytest.raises(dst_prune.DSTError, match=re.escape("the compact optimizer state 'exp_avg' of 0.weight has "
                                                           "shape")):
        run.optimizer.load_state_dict(tampered)
    tampered["state"][0] = dict(state["state"][0], active_indices=state["state"][0]["active_indices"].flip(0))
    with pytest.raises(dst_prune.DSTError, match="in ascending order"):
        run.optimizer.load_state_dict(tampered)
    tampered["state"][0] = dict(state["state"][0], exp_avg=torch.zeros(3, 3))
    tampered["state"][0].pop("active_indices")
    with pytest.raises(dst_prune.DSTError, match=r"has shape \(3, 3\) but the parameter has shape \(8, 4, 3, 3\)"):
        run.optimizer.load_state_dict(tampered)
    for param, state_of in run.optimizer.state.items():
        for key, value in state_of.items():
            assert torch.equal(value, before[param][key])


def test_param_groups_and_lr_schedulers_work_as_with_torch():
    def groups(model):
        return [{"params": [p for n, p in model.named_parameters() if "bias" in n], "lr": 0.02, "weight_decay": 0},
                {"params": [p for n, p in model.named_parameters() if "bias" not in n]}]

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20)

    runs = {}
    for label, cls in (("theirs", torch.optim.AdamW), ("ours", dst_prune.optim.AdamW)):
        model = make_model()
        optimizer = cls(groups(model), lr=1e-2, weight_decay=0.05)
        run = Run.__new__(Run)
        run.model, run.optimizer = model, optimizer
        run.dst = sparse(model, optimizer, "rigl")
        run.scheduler, run.masks, run.step_index = scheduler(optimizer), [], 0
        runs[label] = run.train(10)
    assert runs["ours"].optimizer.param_groups[0]["lr"] == runs["theirs"].optimizer.param_groups[0]["lr"]
    assert_same(runs["ours"], runs["theirs"])


def test_remove_makes_the_state_dense_again_and_training_continues_as_torch():
    reference = Run(OPTIMIZERS["sgd"][0], "set").train(4)
    run = Run(OPTIMIZERS["sgd"][1], "set").train(4)
    for r in (reference, run):
        dst_prune.remove(r.model)
        for step in range(4, 7):
            x, y = batch(step)
            r.optimizer.zero_grad()
            nn.functional.cross_entropy(r.model(x), y).backward()
            r.optimizer.step()
    for a, b in zip(run.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    weight = run.model[0].weight
    assert run.optimizer.state[weight]["momentum_buffer"].shape == weight.shape
    assert "active_indices" not in run.optimizer.state[weight]


def test_an_optimizer_handed_over_later_compacts_its_dense_state():
    model = make_model()
    optimizer = dst_prune.optim.Adam(model.parameters(), lr=1e-2)
    reference_model = make_model()
    reference = torch.optim.Adam(reference_model.parameters(), lr=1e-2)
    dsts = [sparse(m, None, "set") for m in (model, reference_model)]
    for step in range(6):
        if step == 2:
            dsts[0].optimizer, dsts[1].optimizer = optimizer, reference
        for m, o, d in zip((model, reference_model), (optimizer, reference), dsts):
            x, y = batch(step)
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            d.step()
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    target = dsts[0].targets[1]
    assert optimizer.state[target.param]["exp_avg"].shape == (target.active(),)


def test_channels_last_weights_keep_positions_in_memory_order():
    def run(cls):
        model = make_model().to(memory_format=torch.channels_last)
        optimizer = cls(model.parameters(), lr=1e-2)
        dst = sparse(model, optimizer, "set", "kernel")
        for step in range(5):
            x, y = batch(step)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
            optimizer.step()
            dst.step()
        return model, optimizer
    (ours, optimizer), (theirs, _) = run(dst_prune.optim.AdamW), run(torch.optim.AdamW)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ours[0].weight_orig.is_contiguous(memory_format=torch.channels_last)
    assert optimizer.state[ours[0].weight_orig]["exp_avg"].ndim == 1


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: dst_prune.optim.AdamW(p, lr=-1.0), "AdamW: lr must be a number >= 0; received -1.0"),
    (lambda p: dst_prune.optim.Adam(p, betas=(0.9, 1.0)), "Adam: betas[1] must be a number in [0, 1); received 1.0"),
    (lambda p: dst_prune.optim.Adam(p, betas=0.9), "betas must be a pair (beta1, beta2)"),
    (lambda p: dst_prune.optim.SGD(p, lr=0.1, nesterov=True), "nesterov=True needs momentum > 0 and dampening=0"),
    (lambda p: dst_prune.optim.AdamW(p, capturable=True), "AdamW(capturable=True) is not supported"),
    (lambda p: dst_prune.optim.SGD(p, differentiable=True), "SGD(differentiable=True) is not supported"),
    (lambda p: dst_prune.optim.SGD(p, free_gradients="yes"), "free_gradients must be True or False"),
    (lambda p: dst_prune.optim.create("lion", p), "unknown optimizer 'lion'; dst_prune.optim has sgd, adam, adamw"),
    (lambda p: dst_prune.optim.create("adamw", p, momentum=0.9), "unexpected keyword argument 'momentum'"),
])
def test_bad_arguments_are_refused_by_name(make, message):
    with pytest.raises(dst_prune.DSTError, match=re.escape(message)):
        make(make_model().parameters())


def test_create_builds_each_optimizer_by_name():
    model = make_model()
    assert isinstance(dst_prune.optim.create("AdamW", model.parameters(), lr=1e-3), dst_prune.optim.AdamW)
    assert dst_prune.optim.create("sgd", model.parameters(), lr=0.1, momentum=0.9).defaults["momentum"] == 0.9
    assert isinstance(dst_prune.optim.create("adam", model.parameters()), torch.optim.Optimizer)


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "sgd_dampened"])
def test_large_tensors_updated_in_pieces_give_torchs_results(monkeypatch, optimizer):
    """Large tensors are updated a piece at a time (bounded temporaries); pieces of 7 weights exercise it here."""
    monkeypatch.setattr(dst_prune.optim.CompactStateOptimizer, "piece_elements", 7)
    reference = Run(OPTIMIZERS[optimizer][0], "rigl").train(6)
    run = Run(OPTIMIZERS[optimizer][1], "rigl").train(6)
    assert_same(run, reference)
    if optimizer == "adam":
        assert all(float(s["step"]) == 6 for s in run.optimizer.state.values())
