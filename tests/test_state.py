"""Checkpoints on disk: sparse state dicts, the controller's state, exact resume, remove(), loading without args."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import SmallCNN, assert_unchanged, small_cnn_batch, snapshot
from torch import nn

import dst_prune

APPLY = {"sparsity": 0.8, "update_every": 2, "seed": 7}
METHOD_ARGUMENTS = {"dsr": {"pruning_threshold": 0.05}, "set": {}, "rigl": {"total_steps": 10},
                    "srigl": {"total_steps": 10},
                    "snfs": {"total_steps": 10}, "gmp": {"total_steps": 10}, "granet": {"total_steps": 10},
                    "static": {}}


def build(seed=0, method="dsr", **overrides):
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = dst_prune.apply(model, optimizer=optimizer, method=method,
                          **{**APPLY, **METHOD_ARGUMENTS[method], **overrides})
    return model, optimizer, dst


def train(model, optimizer, dst, steps, start=0):
    for i in range(start, start + steps):
        x, y = small_cnn_batch(n=4 + i % 3)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dst.step()


def save(tmp_path, model, optimizer, dst):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dst": dst.state_dict()}, path)
    return path


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sparse_state_dict_loads_into_a_fresh_model_after_apply(tmp_path):
    model, optimizer, dst = build()
    train(model, optimizer, dst, 5)
    path = save(tmp_path, model, optimizer, dst)
    fresh, _, fresh_dst = build(seed=123)  # other random weights, other initial masks
    checkpoint = torch.load(path, weights_only=True)
    fresh.load_state_dict(checkpoint["model"])
    fresh_dst.load_state_dict(checkpoint["dst"])
    assert same_tensors(fresh.state_dict(), model.state_dict())
    assert all(m.dtype == torch.bool for k, m in fresh.state_dict().items() if k.endswith("_mask"))
    x, _ = small_cnn_batch()
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    assert (fresh_dst.step_count, fresh_dst.update_index) == (5, 2)
    assert fresh_dst.algorithm.threshold == dst.algorithm.threshold


@pytest.mark.parametrize("stop_at", [3, 4])
@pytest.mark.parametrize("method", ["dsr", "set", "rigl", "srigl", "snfs", "gmp", "granet"])
def test_resume_is_bitwise_exact(tmp_path, method, stop_at):
    straight = build(method=method)
    train(*straight, 10)

    first = build(method=method)
    train(*first, stop_at)
    path = save(tmp_path, *first)
    model, optimizer, dst = build(seed=99, method=method)
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    dst.load_state_dict(checkpoint["dst"])
    train(model, optimizer, dst, 10 - stop_at, start=stop_at)

    assert same_tensors(model.state_dict(), straight[0].state_dict())
    straight_state = straight[1].state_dict()["state"]
    resumed_state = optimizer.state_dict()["state"]
    assert all(same_tensors(straight_state[k], resumed_state[k]) for k in straight_state)
    assert dst.history == straight[2].history
    assert sum(sum(r["pruned"]) for r in dst.history) > 0


def test_resume_without_the_controller_state_is_refused_before_anything_is_lost(tmp_path):
    """Negative control: forgetting dst.load_state_dict is not a silent divergence: the first forward refuses, with
    the loaded weights kept whole, and loading the controller state then resumes exactly."""
    straight = build()
    train(*straight, 10)
    first = build()
    train(*first, 4)
    path = save(tmp_path, *first)
    model, optimizer, dst = build(seed=99)
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    with pytest.raises(dst_prune.DSTError, match="load the matching controller state"):
        train(model, optimizer, dst, 6, start=4)
    assert same_tensors(model.state_dict(), checkpoint["model"])
    dst.load_state_dict(checkpoint["dst"])
    train(model, optimizer, dst, 6, start=4)
    assert same_tensors(model.state_dict(), straight[0].state_dict())


def test_removed_state_dict_loads_into_an_untouched_timm_model(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.9, optimizer=optimizer, update_every=1)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    optimizer.step()
    dst.step()
    masks = dst.masks()
    masks = {k: v.clone() for k, v in masks.items()}
    model.eval()
    reference = model(x)
    dst_prune.remove(model)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    untouched = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    untouched.load_state_dict(torch.load(tmp_path / "dense.pt", weights_only=True))
    assert torch.equal(untouched(x), reference)
    for name, mask in masks.items():
        assert not untouched.get_parameter(name).detach()[~mask].any()
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert zeros == round(0.9 * dst.n_sparse)


def test_load_sparse_state_dict_needs_no_apply_arguments(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    dst = dst_prune.apply(model, sparsity=0.95, distribution="erk", exclude=["downsample.0.weight"], update_every=1)
    dst.reparameterize()
    torch.save({"model": model.state_dict(), "dst": dst.state_dict()}, tmp_path / "sparse.pt")
    torch.save(dst_prune.pruned_state_dict(model), tmp_path / "pruned.pt")  # torch prune's form

    fresh = timm.create_model("resnet18", pretrained=False, num_classes=10)
    checkpoint = torch.load(tmp_path / "sparse.pt", weights_only=True)
    loaded = dst_prune.load_sparse_state_dict(fresh, checkpoint["model"], masks=checkpoint["dst"])
    old_form = timm.create_model("resnet18", pretrained=False, num_classes=10)
    from_pairs = dst_prune.load_sparse_state_dict(old_form, torch.load(tmp_path / "pruned.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(from_pairs.masks().values(), loaded.masks().values()))
    assert same_tensors(old_form.state_dict(), model.state_dict())
    assert [t.name for t in loaded.targets] == [t.name for t in dst.targets]
    assert loaded.budget == dst.budget and loaded.sparsity == dst.sparsity
    assert same_tensors(fresh.state_dict(), model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    loaded.reparameterize()  # and it keeps training with the exact count
    assert loaded.sparsity == dst.sparsity


def test_load_sparse_state_dict_refuses_what_does_not_fit():
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(dst_prune.DSTError, match="so it does not say which weights are masked: pass masks="):
        dst_prune.load_sparse_state_dict(model, SmallCNN().state_dict())
    other = timm.create_model("resnet18", pretrained=False)
    other_dst = dst_prune.apply(other, sparsity=0.5)
    with pytest.raises(dst_prune.DSTError, match="the checkpoint has a mask for it, but the model has no such"):
        dst_prune.load_sparse_state_dict(model, dst_prune.pruned_state_dict(other))
    with pytest.raises(dst_prune.DSTError, match="which is not a parameter of the model"):
        dst_prune.load_sparse_state_dict(model, other.state_dict(), masks=other_dst.state_dict())
    sparse = SmallCNN()
    sparse_dst = dst_prune.apply(sparse, sparsity=0.5)
    state = sparse.state_dict()
    state["fc1.weight"] = torch.zeros(3, 3)  # a wrong shape: refused before anything is attached or loaded
    with pytest.raises(dst_prune.DSTError, match=r"fc1.weight: the tensor in state_dict has shape \(3, 3\)"):
        dst_prune.load_sparse_state_dict(model, state, masks=sparse_dst.state_dict())
    del state["fc1.weight"]
    with pytest.raises(dst_prune.DSTError, match=r"state_dict does not fit the model: missing \['fc1.weight'\]"):
        dst_prune.load_sparse_state_dict(model, state, masks=sparse_dst.state_dict())
    assert_unchanged(model, before)


def test_controller_state_is_refused_for_another_configuration():
    _, _, dst = build()
    state = copy.deepcopy(dst.state_dict())
    _, _, other = build(exclude=["fc1.weight"])
    with pytest.raises(dst_prune.DSTError, match="state was saved for other sparse tensors"):
        other.load_state_dict(state)
    _, _, denser = build(sparsity=0.5)
    with pytest.raises(dst_prune.DSTError, match=r"state was saved with sparsity=0\.8; this controller was applied "
                                                 r"with sparsity=0\.5"):
        denser.load_state_dict(state)
    with pytest.raises(dst_prune.DSTError, match=r"is not a DynamicSparsity\.state_dict\(\)"):
        dst.load_state_dict({"step": 3})


def test_controller_state_is_plain_values_and_tensors_loadable_with_weights_only(tmp_path):
    model, optimizer, dst = build()
    train(model, optimizer, dst, 4)

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    state = dst.state_dict()
    assert plain(state)
    torch.save(state, tmp_path / "dst.pt")
    loaded = torch.load(tmp_path / "dst.pt", weights_only=True)
    assert loaded["history"] == dst.history and loaded["update_index"] == dst.update_index


@pytest.mark.parametrize(("field", "value"), [("seed", 8), ("distribution", "erk"), ("granularity", "kernel"),
                                              ("sparsity", 0.7)])
def test_resume_refuses_a_state_of_another_sparse_model_naming_the_field(field, value):
    model, optimizer, dst = build(method="set")
    train(model, optimizer, dst, 3)
    state = copy.deepcopy(dst.state_dict())
    torch.manual_seed(0)
    other_model = SmallCNN()
    other = dst_prune.apply(other_model, method="set", **{**APPLY, field: value})
    before = snapshot(other_model), copy.deepcopy(other.state_dict())
    saved = {"seed": 7, "distribution": "uniform", "granularity": "element", "sparsity": 0.8}[field]
    with pytest.raises(dst_prune.DSTError, match=f"saved with {field}={saved!r}; this controller was applied with "
                                                 f"{field}={value!r}"):
        other.load_state_dict(state)
    assert_unchanged(other_model, before[0])
    assert other.state_dict()["masks_digest"] == before[1]["masks_digest"] and other.step_count == 0


def test_resume_takes_the_new_schedule_and_hyperparameters_and_says_so(caplog):
    model, optimizer, dst = build(method="rigl")
    train(model, optimizer, dst, 4)
    state = copy.deepcopy(dst.state_dict())
    _, _, resumed = build(method="rigl", update_every=3, total_steps=20, drop_fraction=0.5)
    with caplog.at_level("WARNING", logger="dst_prune.controller.controller"):
        resumed.load_state_dict(state)
    changed = " ".join(r.getMessage() for r in caplog.records)
    assert "another schedule" in changed and "another total_steps" in changed and "another hyperparameters" in changed
    assert resumed.step_count == 4 and resumed.schedule.update_every == 3 and resumed.total_steps == 20
    assert resumed.algorithm.drop_fraction == 0.5 and resumed.schedule.stop_step == 15  # 0.75 * 20, not 0.75 * 10
    assert [t.mask.sum() for t in resumed.targets] == [t.mask.sum() for t in dst.targets]


def test_a_state_whose_budget_does_not_match_its_sparsity_is_refused():
    _, _, half = build(method="set", sparsity=0.5)
    state = copy.deepcopy(half.state_dict())
    state["sparsity"] = 0.8  # relabelled: the masks still hold half the weights
    _, _, dst = build(method="set")
    with pytest.raises(dst_prune.DSTError, match=r"keeps .* active weights .* but sparsity=0\.8 keeps exactly"):
        dst.load_state_dict(state)


def test_weights_loaded_before_their_masks_are_kept_whole_until_the_masks_come(tmp_path):
    model, optimizer, dst = build(method="set")
    train(model, optimizer, dst, 6)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(dst.state_dict())
    x, _ = small_cnn_batch()
    expected = model(x)

    # model first, controller second (the documented "either order"): nothing is lost
    fresh, _, fresh_dst = build(method="set", seed=3)
    fresh.load_state_dict(weights)
    assert torch.equal(fresh.state_dict()["conv.weight"], weights["conv.weight"])  # saved whole, not masked
    fresh_dst.load_state_dict(state)
    assert torch.equal(fresh(x), expected)

    # the controller state forgotten: the forward, an update and remove refuse, and nothing is discarded
    forgot, _, forgot_dst = build(method="set", seed=4)
    forgot.load_state_dict(weights)
    for call in (lambda: forgot(x), lambda: forgot_dst.reparameterize(), lambda: dst_prune.remove(forgot)):
        with pytest.raises(dst_prune.DSTError, match="Nothing was discarded: load the matching controller state"):
            call()
    assert torch.equal(forgot.state_dict()["conv.weight"], weights["conv.weight"])
    forgot_dst.load_state_dict(state)
    assert torch.equal(forgot(x), expected)

    # weights of another step than the controller state: refused naming the tensor, nothing changes
    train(model, optimizer, dst, 4, start=6)
    later = copy.deepcopy(model.state_dict())
    mixed, _, mixed_dst = build(method="set", seed=5)
    mixed.load_state_dict(later)
    before = copy.deepcopy(mixed_dst.state_dict())
    with pytest.raises(dst_prune.DSTError, match=r"non-zero outside the mask of this controller state"):
        mixed_dst.load_state_dict(state)
    assert mixed_dst.state_dict()["masks_digest"] == before["masks_digest"]
    assert torch.equal(mixed.state_dict()["conv.weight"], later["conv.weight"])


def test_load_sparse_state_dict_validates_the_controller_state_it_takes_masks_from():
    model, optimizer, dst = build(method="set")
    train(model, optimizer, dst, 4)
    early = copy.deepcopy(dst.state_dict())
    train(model, optimizer, dst, 6, start=4)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(dst.state_dict())

    def corrupt_byte(s):
        s["masks"][1][0] ^= 1

    cases = {"another step": (lambda s: s.update(copy.deepcopy(early)), "non-zero outside the mask given for it"),
             "flipped byte": (corrupt_byte, "do not match their digest"),
             "one mask short": (lambda s: s["masks"].pop(), "masks for 4 sparse tensors"),
             "not bytes": (lambda s: s["masks"].__setitem__(0, "x"), "is not its")}
    for name, (corrupt, message) in cases.items():
        torch.manual_seed(0)
        fresh = SmallCNN()
        before = snapshot(fresh)
        bad = copy.deepcopy(state)
        corrupt(bad)
        with pytest.raises(dst_prune.DSTError, match=message):
            dst_prune.load_sparse_state_dict(fresh, weights, masks=bad)
        assert_unchanged(fresh, before), name
    torch.manual_seed(0)
    fresh = SmallCNN()
    loaded = dst_prune.load_sparse_state_dict(fresh, weights, masks=state)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(loaded.targets, dst.targets))


def test_nonzero_masks_leave_embeddings_and_biases_dense():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8, padding_idx=0)  # its padding row is all zeros
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            return self.head(torch.relu(self.fc(self.embed(tokens).mean(1))))

    torch.manual_seed(0)
    trained = Net()
    nn.init.zeros_(trained.fc.bias)
    dst = dst_prune.apply(trained, sparsity=0.5, dense_stem_and_head=False, method="static")
    weights = trained.state_dict()
    loaded = dst_prune.load_sparse_state_dict(Net(), weights, masks="nonzero")
    assert sorted(t.name for t in loaded.targets) == sorted(t.name for t in dst.targets) == ["fc.weight",
                                                                                             "head.weight"]
