"""Which parameters of a model become sparse.

By default the weights of `nn.Linear` (and transformers' `Conv1D`, GPT-2's), every convolution
(`Conv1d/2d/3d`, grouped and depthwise ones, `ConvTranspose*`), the `weight_ih_l*/weight_hh_l*/weight_hr_l*`
of `nn.LSTM/GRU/RNN` and their cells, and the input projections of `nn.MultiheadAttention` (its
`out_proj` is an `nn.Linear`). Never biases, norm layers or embeddings unless named in `include`. The
stem and the classifier head stay dense unless `dense_stem_and_head=False`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize, prune

from .errors import DSTError

__all__ = ["NameFilter", "TargetSpec", "default_tensor_names", "find_targets", "is_transformers_conv1d",
           "stem_and_head", "weight_layout"]

NameFilter = str | Sequence[str] | None


@dataclass(frozen=True)
class TargetSpec:
    """A parameter chosen to become sparse, by name.

    Attributes:
        name: qualified parameter name, e.g. `layer1.0.conv1.weight`.
        module_name: qualified name of the module that owns it (`layer1.0.conv1`; `""` for the root).
        tensor_name: the attribute name on that module (`weight`, `weight_ih_l0`, `in_proj_weight`).
        layout: `(output dim, input dim)` of the weight: `(0, 1)`, or `(1, 0)` for transformers' `Conv1D`.
    """

    name: str
    module_name: str
    tensor_name: str
    layout: tuple[int, int] = (0, 1)


def qualified(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D` (GPT-2's layers): a linear layer storing its weight as input x
    output. Recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def weight_layout(module: nn.Module, tensor_name: str) -> tuple[int, int]:
    """`(output dim, input dim)` of `module.<tensor_name>`."""
    return (1, 0) if tensor_name == "weight" and is_transformers_conv1d(module) else (0, 1)


def default_tensor_names(module: nn.Module) -> list[str]:
    """The names of the weights of `module` that are sparse by default (its own, not its children's)."""
    if isinstance(module, (nn.Linear, _ConvNd)) or is_transformers_conv1d(module):
        return ["weight"]
    if isinstance(module, nn.RNNBase):
        return [n for n in module._flat_weights_names if n.startswith("weight_")]
    if isinstance(module, nn.RNNCellBase):
        return ["weight_ih", "weight_hh"]
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return []


def _module_weight(modules: dict[str, nn.Module], module_name: str) -> str | None:
    module = modules.get(module_name)
    if module is None or not isinstance(module._parameters.get("weight"), torch.Tensor):
        return None
    return qualified(module_name, "weight")


def stem_and_head(model: nn.Module) -> tuple[str | None, list[str]]:
    """The parameter names of the stem conv and of the classifier head(s).

    timm models name them in `pretrained_cfg["first_conv"]` and `["classifier"]` (a name or a tuple of
    names, e.g. a distillation head). Otherwise the stem is the first convolution in registration order
    (which is execution order in timm and torchvision models; `None` if the model has no conv) and the
    head is the last `nn.Linear`.
    """
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}

    stem = None
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, str) and first_conv in modules:
        stem = _module_weight(modules, first_conv)
    elif first_conv is None or first_conv not in modules:
        conv = next((n for n, m in modules.items() if isinstance(m, _ConvNd)), None)
        stem = _module_weight(modules, conv) if conv is not None else None

    classifier = cfg.get("classifier")
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    found = [n for n in names if n in modules]
    if found:
        heads = [w for w in (_module_weight(modules, n) for n in found) if w is not None]
    else:
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        heads = [w for w in [_module_weight(modules, linear[-1])] if w is not None] if linear else []
    return stem, heads


def _compile_filter(value: NameFilter, argument: str) -> list[tuple[str, object]]:
    """Turn `include`/`exclude` into (entry, matcher) pairs; a string is one regex, a list is names."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise DSTError(f"{argument}={value!r} is not a valid regular expression ({error}). "
                           f"Pass a regex matched with re.fullmatch, or a list of parameter names.") from None
        return [(value, lambda name, p=pattern: p.fullmatch(name) is not None)]
    if isinstance(value, Iterable) and all(isinstance(v, str) for v in value):
        entries = list(value)
        if not entries:
            raise DSTError(f"{argument}=[] is empty. Pass None to use the default, or name parameters.")
        return [(e, lambda name, e=e: name == e or name.endswith("." + e)) for e in entries]
    raise DSTError(f"{argument} must be None, a regex string or a list of parameter names; "
                   f"received {type(value).__name__}.")


def _unmatched(entry: str, names: list[str], argument: str) -> DSTError:
    close = difflib.get_close_matches(entry, names, n=5, cutoff=0.4)
    if not close:
        tail = entry.split(".")[-1].strip("^$*.\\")
        close = [n for n in names if tail and tail in n][:5]
    hint = f" Close names: {', '.join(close)}." if close else f" Parameters look like: {', '.join(names[:5])}."
    return DSTError(f"{argument} entry '{entry}' matches no parameter of the model.{hint}")


def _logical_parameters(module: nn.Module) -> list[tuple[str, str]]:
    """The module's own parameters as `(name, state)`, state `plain`, `pruned` or `parametrized`.

    A `torch.nn.utils.prune`d `weight_orig` is listed as `weight`; a parametrized tensor by its name.
    """
    pruned = {h._tensor_name for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)}
    found = []
    for tensor_name, param in module._parameters.items():
        if param is None:
            continue
        base = tensor_name[: -len("_orig")] if tensor_name.endswith("_orig") else None
        found.append((base, "pruned") if base in pruned else (tensor_name, "plain"))
    if parametrize.is_parametrized(module):
        found.extend((name, "parametrized") for name in module.parametrizations)
    return found


def _tied_names(model: nn.Module) -> dict[int, set[tuple[int, str, str]]]:
    """For every parameter tensor, the (module, attribute) pairs that hold it, with a qualified name."""
    owners: dict[int, set[tuple[int, str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for tensor_name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), set()).add((id(module), tensor_name, qualified(module_name, tensor_name)))
    return owners


def _refuse_unsupported(module: nn.Module, tensor_name: str, name: str,
                        owners: dict[int, set[tuple[int, str, str]]]) -> None:
    param = module._parameters[tensor_name]
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise DSTError(f"{name} is an uninitialized lazy parameter. Run one forward pass (or "
                       f"materialize the lazy module) before dst_prune.apply.")
    if param.is_meta:
        raise DSTError(f"{name} is on the meta device and holds no values. Materialize the model "
                       f"(e.g. model.to_empty(device=...) and load weights) before dst_prune.apply.")
    holders = {(m, t) for m, t, _ in owners.get(id(param), set())}
    if len(holders) > 1:
        both = sorted(q for _, _, q in owners[id(param)])
        raise DSTError(f"{name} is tied: the same tensor is the parameter {' and '.join(both)}. A mask on one "
                       f"name would not apply to the other. Exclude it (exclude={both!r}) or untie the weights.")


def find_targets(model: nn.Module, *, include: NameFilter = None, exclude: NameFilter = None,
                 dense_stem_and_head: bool = True) -> list[TargetSpec]:
    """Choose the parameters to sparsify, without touching the model.

    Args:
        model: the model.
        include: `None` for the default selection; else exactly the parameters it matches become sparse
            (of any layer type; the dense stem/head rule does not apply to them). A string is a regex
            matched with `re.fullmatch` against the qualified name; a list entry matches the full name or
            a `.`-suffix of it (`"downsample.0.weight"` matches every block's).
        exclude: parameters to keep dense, in the same forms; applied after `include`.
        dense_stem_and_head: keep the stem conv and the classifier head dense (default selection only).

    Returns:
        The targets in registration order.

    Raises:
        DSTError: an include/exclude entry matches nothing, nothing is left to sparsify, or a chosen
            parameter is meta, lazy, parametrized, already pruned or tied.
    """
    include_matchers = _compile_filter(include, "include")
    exclude_matchers = _compile_filter(exclude, "exclude")
    if not isinstance(dense_stem_and_head, bool):
        raise DSTError(f"dense_stem_and_head must be True or False; received {dense_stem_and_head!r}.")

    candidates: list[TargetSpec] = []
    all_names: list[str] = []
    states: dict[str, str] = {}
    for module_name, module in model.named_modules():
        own = set(default_tensor_names(module))
        for tensor_name, state in _logical_parameters(module):
            spec = TargetSpec(qualified(module_name, tensor_name), module_name, tensor_name,
                              weight_layout(module, tensor_name))
            all_names.append(spec.name)
            states[spec.name] = state
            if include_matchers or tensor_name in own:
                candidates.append(spec)

    if include_matchers:
        for entry, match in include_matchers:
            if not any(match(c.name) for c in candidates):
                raise _unmatched(entry, all_names, "include")
        candidates = [c for c in candidates if any(match(c.name) for _, match in include_matchers)]
    elif dense_stem_and_head:
        stem, heads = stem_and_head(model)
        dense = {stem, *heads}
        candidates = [c for c in candidates if c.name not in dense]

    for entry, match in exclude_matchers:
        if not any(match(name) for name in all_names):
            raise _unmatched(entry, all_names, "exclude")
    candidates = [c for c in candidates if not any(match(c.name) for _, match in exclude_matchers)]

    modules = dict(model.named_modules())
    for c in candidates:
        if states[c.name] == "pruned":
            raise DSTError(f"{c.name} is already pruned by torch.nn.utils.prune. Call dst_prune.remove(model) "
                           f"(or prune.remove(module, {c.tensor_name!r})) first, or exclude {c.name!r}.")
        if states[c.name] == "parametrized":
            raise DSTError(f"{c.name} is parametrized (torch.nn.utils.parametrize). Remove the parametrization "
                           f"first (parametrize.remove_parametrizations) or exclude {c.name!r}.")
    frozen = {c.name for c in candidates if not modules[c.module_name]._parameters[c.tensor_name].requires_grad}
    targets = [c for c in candidates if c.name not in frozen]
    if not targets:
        why = f" ({len(frozen)} matching parameters are frozen: requires_grad=False)" if frozen else ""
        raise DSTError(f"Nothing to sparsify: no trainable parameter of the model was selected{why}. "
                       f"Supported layers are Linear, Conv*, ConvTranspose*, LSTM/GRU/RNN and "
                       f"MultiheadAttention; name other parameters with include=..., or check exclude.")

    owners = _tied_names(model)
    for t in targets:
        _refuse_unsupported(modules[t.module_name], t.tensor_name, t.name, owners)
    return targets
