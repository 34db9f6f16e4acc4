"""Every private or fragile torch API dst_prune uses (`dst_prune._torch`) still does what dst_prune relies on.

When torch changes one of them, the test named after it fails here first, before the behaviour built on it.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from dst_prune import _torch


def test_state_dict_hook_edits_the_state_dict_in_place():
    module = nn.Linear(3, 2)

    def rename(module, state, prefix, local_metadata):
        state[prefix + "renamed"] = state.pop(prefix + "weight")

    _torch.register_state_dict_hook(module, rename)
    assert list(module.state_dict()) == ["bias", "renamed"]
    outer = nn.Sequential(module)
    assert "0.renamed" in outer.state_dict()  # a child's hook applies under a parent too


def test_load_state_dict_pre_hook_runs_before_the_module_reads_its_entries():
    module = nn.Linear(3, 2)
    seen = []

    def hook(module, state, prefix, local_metadata, strict, missing, unexpected, errors):
        seen.append(module)
        state[prefix + "weight"] = state.pop(prefix + "w")

    _torch.register_load_state_dict_pre_hook(module, hook)
    module.load_state_dict({"w": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert seen == [module] and torch.equal(module.weight.detach(), torch.ones(2, 3))


def test_is_view_tells_views_from_owners():
    base = torch.zeros(4, 4)
    assert _torch.is_view(base[1:]) and not _torch.is_view(base)


def test_rnn_flat_weights_follow_replaced_parameters():
    lstm = nn.LSTM(4, 4)
    replacement = nn.Parameter(torch.zeros_like(lstm.weight_ih_l0))
    lstm._parameters["weight_ih_l0"] = replacement
    _torch.refresh_rnn_flat_weights(lstm)
    assert any(w is replacement for w in lstm._flat_weights)


def test_ddp_reads_the_ignore_attribute():
    model = nn.Linear(2, 2)
    _torch.ddp_ignore(model, ["a_mask"])
    _torch.ddp_ignore(model, ["b_mask"])
    assert getattr(model, _torch.DDP_IGNORE_ATTRIBUTE) == ["a_mask", "b_mask"]
    source = torch.nn.parallel.DistributedDataParallel.__init__
    assert _torch.DDP_IGNORE_ATTRIBUTE in inspect.getsource(inspect.getmodule(source))


def test_fsdp1_flat_parameter_marker_is_recognised():
    flat = torch.zeros(6)
    flat._is_flat_param = True
    assert _torch.is_flat_param_view(flat) and _torch.is_flat_param_view(flat[:3])
    assert not _torch.is_flat_param_view(torch.zeros(6)[:3])


def test_local_shape_and_offset_of_a_shard():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shape, offset = _torch.local_shape_and_offset(torch.Size([5, 3]), mesh, (Shard(0),))
    finally:
        dist.destroy_process_group()
    assert shape == (5, 3) and offset == (0, 0)  # the one rank holds it all (2 ranks: tests/test_fsdp.py)


def test_set_nested_element_writes_into_a_nested_state_dict():
    state = {"optimizer": {"state": {"0": {}}}}
    _torch.set_nested_element(state, ("optimizer", "state", "0", "step"), 7)
    assert state["optimizer"]["state"]["0"]["step"] == 7


def test_method_source_finds_a_parent_reading_a_child_weight():
    source = _torch.method_source(nn.MultiheadAttention, "forward")
    assert "self.out_proj.weight" in source
    assert _torch.method_source(nn.Linear, "no_such_method") == ""
    assert _torch.method_source(copy.deepcopy(nn.Identity()).__class__, "forward")
