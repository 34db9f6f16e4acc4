"""Bad input and faults: non-finite values never break the exact count, and every refused or failed operation
leaves model, masks, optimizer and controller exactly as they were (masking rule 11 (docs/design.md))."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import SmallCNN, assert_invariants, assert_unchanged, small_cnn_batch, snapshot
from torch import nn

import dst_prune

METHOD_ARGUMENTS = {"static": {}, "set": {}, "dsr": {"pruning_threshold": 0.02}, "rigl": {"total_steps": 12},
                    "srigl": {"total_steps": 12},
                    "snfs": {"total_steps": 12}, "gmp": {"total_steps": 12}, "granet": {"total_steps": 12}}
GRADIENT_METHODS = ("rigl", "srigl", "snfs", "granet")


def build(method="rigl", seed=0, **overrides):
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    arguments = {"sparsity": 0.8, "update_every": 2, "seed": 3, **METHOD_ARGUMENTS[method], **overrides}
    return model, optimizer, dst_prune.apply(model, optimizer=optimizer, method=method, **arguments)


def backward(model, optimizer, i=0):
    x, y = small_cnn_batch(n=4 + i % 3)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def train(model, optimizer, dst, steps, start=0):
    for i in range(start, start + steps):
        backward(model, optimizer, i)
        optimizer.step()
        dst.step()


def full_state(model, optimizer, dst):
    """Everything an update may change, copied."""
    return copy.deepcopy({"model": dst_prune.pruned_state_dict(model), "optimizer": optimizer.state_dict(),
                          "grads": [None if t.orig.grad is None else t.orig.grad.clone() for t in dst.targets],
                          "dst": dst.state_dict()})


def assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for x, y in zip(a["grads"], b["grads"]):
        assert (x is None and y is None) or torch.equal(x, y)
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k][n], state_b[k][n]) for k in state_a for n in state_a[k])
    for key in ("step_count", "update_index", "budget", "history", "masks_digest"):
        assert a["dst"][key] == b["dst"][key], key


# --- non-finite values ---------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["magnitude", "random"])
def test_non_finite_weights_at_apply_are_refused_naming_the_tensor(init):
    model = SmallCNN()
    with torch.no_grad():
        model.fc1.weight[3, 2] = float("nan")
        model.conv.weight[0, 0, 0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(dst_prune.DSTError, match=r"conv.weight has 1 non-finite values \(NaN or inf\)"):
        dst_prune.apply(model, sparsity=0.9, init=init)
    assert_unchanged(model, before)
    assert not dst_prune.is_sparse(model)


@pytest.mark.parametrize("method", list(METHOD_ARGUMENTS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_and_gradients_never_change_the_count(method, bad, caplog):
    """A diverged weight and diverged gradient entries at an update: the exact count holds, the bad weight is
    dropped first and restarts at zero, no bad gradient entry decides a growth, and each event is logged."""
    model, optimizer, dst = build(method)
    train(model, optimizer, dst, 1)
    layer = next(i for i, t in enumerate(dst.targets) if t.name == "fc1.weight")
    target = dst.targets[layer]
    position = int(target.mask.reshape(-1).nonzero()[0])
    backward(model, optimizer, 1)
    optimizer.step()
    with torch.no_grad():
        target.orig.view(-1)[position] = bad
    for sink in dst.dense_gradient_sinks:
        if sink.value is not None:
            sink.value.view(-1)[:7] = bad  # non-finite captured gradients
    caplog.set_level(logging.WARNING, logger="dst_prune")
    updated = dst.step()
    assert_invariants(dst, optimizer)
    assert all(t.active() > 0 for t in dst.targets)
    if method == "static":
        assert not updated and not dst.history
        return
    assert updated and sum(dst.history[-1]["active"]) == dst.budget
    assert target.orig.reshape(-1)[position] == 0 and torch.isfinite(target.orig).all()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "fc1.weight" in logged and "non-finite" in logged
    if method in GRADIENT_METHODS:
        assert "dense gradient" in logged
    if method == "snfs":
        assert all(torch.isfinite(m).all() for m in dst.algorithm.gradient_momentum)
    train(model, optimizer, dst, 6, start=2)  # and training goes on, finite
    assert_invariants(dst, optimizer)
    assert all(torch.isfinite(t.orig).all() for t in dst.targets)


def test_rigl_with_a_nan_gradient_keeps_exactly_750_of_7500():
    """The reported case: one NaN in RigL's captured gradient used to leave 734 of 750 weights active."""
    model = nn.Sequential(nn.Linear(100, 75, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = dst_prune.apply(model, sparsity=0.9, method="rigl", total_steps=100, update_every=1,
                          dense_stem_and_head=False, optimizer=optimizer)
    model(torch.randn(8, 100)).sum().backward()
    dst.dense_gradient_sinks[0].value[5, 7] = float("nan")
    optimizer.step()
    assert dst.step()
    assert dst.targets[0].active() == 750 == dst.budget
    assert not dst.masks()["0.weight"][5, 7]


# --- transactions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["set", "dsr", "rigl", "srigl", "snfs", "gmp", "granet"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_update_that_fails_halfway_is_undone_exactly(method, error, monkeypatch):
    model, optimizer, dst = build(method)
    train(model, optimizer, dst, 3)
    backward(model, optimizer, 3)
    optimizer.step()
    before = full_state(model, optimizer, dst)
    calls = {"n": 0}
    real = dst.algorithm.context.set_indices

    def fail_on_the_second_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error("interrupted in the middle of an update")
        return real(*args, **kwargs)

    monkeypatch.setattr(dst.algorithm.context, "set_indices", fail_on_the_second_write)
    assert dst.algorithm.is_update_step(4)
    with pytest.raises(error):
        dst.step()
    assert calls["n"] == 2  # it did write before failing
    assert_same_state(full_state(model, optimizer, dst), before)
    monkeypatch.undo()
    assert dst.step()  # and the same step then goes through
    assert_invariants(dst, optimizer)


def test_dsr_steps_out_of_order_are_refused_and_lose_no_budget():
    model, optimizer, dst = build("dsr", pruning_threshold=0.3)
    train(model, optimizer, dst, 1)
    with pytest.raises(dst_prune.DSTError, match=r"adjust_pruning_threshold\(\) follows prune_by_threshold\(\)"):
        dst.adjust_pruning_threshold()
    with pytest.raises(dst_prune.DSTError, match=r"reallocate_free_parameters\(\) follows"):
        dst.reallocate_free_parameters()
    freed = dst.prune_by_threshold()
    assert freed > 0
    for call in (dst.prune_by_threshold, dst.reparameterize, lambda: dst.state_dict()):
        with pytest.raises(dst_prune.DSTError, match=r"not regrown yet|Finish the update first"):
            call()
    with pytest.raises(dst_prune.DSTError, match=r"follows prune_by_threshold\(\) and adjust_pruning_threshold"):
        dst.reallocate_free_parameters()
    dst.adjust_pruning_threshold()
    with pytest.raises(dst_prune.DSTError, match="once per update"):
        dst.adjust_pruning_threshold()
    assert dst.reallocate_free_parameters() == freed
    assert_invariants(dst, optimizer)
    train(model, optimizer, dst, 4, start=1)
    assert_invariants(dst, optimizer)


CORRUPTIONS = {
    "flipped mask byte": lambda s: s["masks"][1].view(-1).__setitem__(0, s["masks"][1].view(-1)[0] ^ 1),
    "budget": lambda s: s.__setitem__("budget", s["budget"] + 1),
    "missing schedule": lambda s: s.pop("schedule"),
    "ever_active length": lambda s: s["ever_active"].__setitem__(0, s["ever_active"][0][:-1]),
    "step type": lambda s: s.__setitem__("step_count", "7"),
    "history": lambda s: s.__setitem__("history", None),
    "dsr threshold": lambda s: s["algorithm"].__setitem__("threshold", float("nan")),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupted_controller_state_is_refused_and_changes_nothing(corruption):
    model, optimizer, dst = build("dsr")
    train(model, optimizer, dst, 3)
    state = copy.deepcopy(dst.state_dict())
    other_model, other_optimizer, other = build("dsr", seed=5)
    before = full_state(other_model, other_optimizer, other)
    CORRUPTIONS[corruption](state)
    with pytest.raises(dst_prune.DSTError):
        other.load_state_dict(state)
    assert_same_state(full_state(other_model, other_optimizer, other), before)


def test_a_model_state_with_other_mask_counts_is_refused_before_loading():
    model, optimizer, dst = build("set")
    denser_model, _, _ = build("set", sparsity=0.5)
    before = snapshot(model)
    with pytest.raises(dst_prune.DSTError, match=r"the state dict's masks hold .* but the controller keeps exactly"):
        model.load_state_dict(dst_prune.pruned_state_dict(denser_model))
    assert_unchanged(model, before)
    train(model, optimizer, dst, 4)  # and it trains on
    assert_invariants(dst, optimizer)


def test_masks_written_behind_the_controllers_back_stop_the_next_update_with_a_clear_error():
    _, _, dst = build("set")
    with torch.no_grad():
        dst.targets[0].mask.view(-1)[:] = True
    with pytest.raises(dst_prune.DSTError, match="masks were loaded or written without the controller state"):
        dst.reparameterize()


def test_bad_schedule_arguments_are_dst_errors():
    for double_at, message in ((None, "double_at must be a list of positive integers"),
                               ([100, 0], "double_at must be a positive integer"),
                               ("100", "double_at must be a list")):
        with pytest.raises(dst_prune.DSTError, match=message):
            dst_prune.apply(SmallCNN(), sparsity=0.9, double_at=double_at)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_of_the_export_works_as_the_refusal_advises():
    model = SmallCNN().eval()
    dst_prune.apply(model, sparsity=0.9)
    scripted = torch.jit.script(dst_prune.export(model))
    x, _ = small_cnn_batch()
    assert torch.equal(scripted(x), model(x))
    with pytest.raises(dst_prune.DSTError, match=r"torch.jit.script\(dst_prune.export\(model\)\)"):
        dst_prune.apply(torch.jit.script(SmallCNN()), sparsity=0.9)


def test_a_method_whose_bind_fails_leaves_the_model_untouched_and_a_retry_works(monkeypatch):
    torch.manual_seed(0)
    model = SmallCNN()
    before = snapshot(model)

    def failing_bind(self, context):
        raise RuntimeError("bind failed")

    monkeypatch.setattr(dst_prune.algorithms.SET, "bind", failing_bind)
    with pytest.raises(RuntimeError, match="bind failed"):
        dst_prune.apply(model, sparsity=0.8, method="set")
    assert_unchanged(model, before)  # the weights were not zeroed either
    assert not dst_prune.is_sparse(model) and not model._load_state_dict_pre_hooks
    monkeypatch.undo()
    dst = dst_prune.apply(model, sparsity=0.8, method="set")  # not refused as "already sparse"
    assert dst.budget == round(0.2 * dst.n_sparse)


def test_masks_with_no_active_weight_are_refused_by_load_sparse_state_dict():
    torch.manual_seed(0)
    model = SmallCNN()
    before = snapshot(model)
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n == "conv.weight"}
    weights = {k: torch.zeros_like(v) if k == "conv.weight" else v for k, v in model.state_dict().items()}
    with pytest.raises(dst_prune.DSTError, match="no active weight at all"):
        dst_prune.load_sparse_state_dict(model, weights, masks=masks)
    assert_unchanged(model, before)


def test_a_failing_algorithm_load_changes_nothing_in_the_controller(monkeypatch):
    model, optimizer, dst = build("dsr")
    train(model, optimizer, dst, 3)
    state = copy.deepcopy(dst.state_dict())
    other_model, other_optimizer, other = build("dsr", seed=5)
    before = full_state(other_model, other_optimizer, other), other.schedule, other.algorithm.threshold

    def failing_load(self, saved):
        self.threshold = -1.0  # halfway through its own load
        raise RuntimeError("algorithm load failed")

    monkeypatch.setattr(type(other.algorithm), "load_state_dict", failing_load)
    with pytest.raises(RuntimeError, match="algorithm load failed"):
        other.load_state_dict(state)
    assert_same_state(full_state(other_model, other_optimizer, other), before[0])
    assert other.schedule == before[1] and other.algorithm.threshold == before[2] and other.step_count == 0


def test_metrics_that_raise_or_are_not_plain_values_undo_the_update(monkeypatch):
    np = pytest.importorskip("numpy")
    model, optimizer, dst = build("set")
    train(model, optimizer, dst, 1)
    for metrics, error in ((lambda self: 1 / 0, ZeroDivisionError),
                           (lambda self: {"score": np.float64(0.5)}, dst_prune.DSTError)):
        monkeypatch.setattr(type(dst.algorithm), "metrics", metrics)
        backward(model, optimizer, 1)
        optimizer.step()
        before = full_state(model, optimizer, dst)
        ever = [e.clone() for e in dst.ever_active]
        with pytest.raises(error, match=r"numpy\.float64|division"):
            dst.step()
        assert_same_state(full_state(model, optimizer, dst), before)
        assert all(torch.equal(a, b) for a, b in zip(ever, dst.ever_active))
    monkeypatch.undo()
    assert dst.step()  # and the same step then goes through
    assert_invariants(dst, optimizer)


def test_a_method_state_that_weights_only_cannot_read_is_refused_when_saving(monkeypatch):
    np = pytest.importorskip("numpy")
    _, _, dst = build("dsr")
    monkeypatch.setattr(type(dst.algorithm), "state_dict", lambda self: {"threshold": np.float64(0.1)})
    with pytest.raises(dst_prune.DSTError, match=r"method='dsr''s state_dict\(\) holds numpy.float64"):
        dst.state_dict()


def test_a_method_returning_scores_or_counts_of_the_wrong_form_is_named_and_undone(monkeypatch):
    model, optimizer, dst = build("snfs")
    train(model, optimizer, dst, 1)
    cases = [("grow_scores", lambda self, layer: torch.zeros(3), r"grow_scores\(0\) for conv\.weight returned Tensor "
                                                                 r"of shape \(3,\)"),
             ("drop_scores", lambda self, layer: torch.ones(()), r"drop_scores\(0\) .* shape \(\)"),
             ("grow_counts", lambda self, dropped, rooms: [0] * len(dropped), r"grow_counts\(dropped=\[.*\]\) returned "
                                                                             r"\[0, 0, 0, 0\]; expected 4 integers")]
    for name, replacement, message in cases:
        monkeypatch.setattr(type(dst.algorithm), name, replacement)
        backward(model, optimizer, 1)
        optimizer.step()
        before = full_state(model, optimizer, dst)
        with pytest.raises(dst_prune.DSTError, match=message):
            dst.step()
        assert_same_state(full_state(model, optimizer, dst), before)
        monkeypatch.undo()


def test_a_saved_snfs_momentum_with_nan_loads_as_zero_there():
    model, optimizer, dst = build("snfs")
    train(model, optimizer, dst, 3)
    state = copy.deepcopy(dst.state_dict())
    state["algorithm"]["momentum"][0][0, 0, 0, 0] = float("nan")
    _, _, other = build("snfs", seed=5)
    other.load_state_dict(state)
    momentum = other.algorithm.gradient_momentum
    assert all(torch.isfinite(m).all() for m in momentum) and momentum[0][0, 0, 0, 0] == 0
