"""Build a model by name for `scripts/train.py`: timm names, torchvision's (`tv:resnet50`) and dst_prune's own.

dst_prune's models are registered with timm's registry by `create_model` (or `register_timm_models()`), so
`timm.create_model("wrn_28_2")` finds them too.
"""

from __future__ import annotations

import timm
from torch import nn

from ..errors import DSTError
from .timm_models import register_timm_models

__all__ = ["create_model", "register_timm_models"]


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    name, last = next((n, m) for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear))
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def _offline_hint(name: str, error: OSError) -> DSTError:
    """The error for pretrained weights that are neither in the local cache nor reachable."""
    if name.startswith("tv:"):
        where = ("torchvision's cache, $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints)",
                 f"torchvision.models.get_model({name[3:]!r}, weights='DEFAULT')")
    else:
        where = ("the Hugging Face cache, $HF_HOME/hub (default ~/.cache/huggingface/hub; $HF_HUB_CACHE if set)",
                 f"timm.create_model({name!r}, pretrained=True)")
    return DSTError(f"{name}: pretrained weights are not in {where[0]} and could not be downloaded "
                    f"({type(error).__name__}: {str(error)[:200]}). Fill the cache on a machine with a network "
                    f"(python -c \"import timm, torchvision; {where[1]}\") and copy that folder here, or train "
                    f"without --pretrained. With HF_HUB_OFFLINE=1 the hub fails at once instead of retrying.")


def create_model(name: str, *, num_classes: int, in_chans: int = 3, img_size: int = 224,
                 pretrained: bool = False, **kwargs: object) -> nn.Module:
    """A model from timm (`resnet50`, `vit_small_patch16_224`, `lenet_300_100`, ...) or torchvision (`tv:...`).

    With `pretrained`, weights come from timm's/torchvision's caches (nothing here downloads); a
    torchvision classifier is replaced when `num_classes` differs from the weights' 1000.

    Raises:
        DSTError: `pretrained` weights that are not in the local cache and cannot be fetched (the message names
            the cache folder and how to fill it).
    """
    register_timm_models()
    try:
        return _create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                             pretrained=pretrained, **kwargs)
    except OSError as error:  # the hub's LocalEntryNotFoundError, torch.hub's URLError: both OSErrors
        if not pretrained:
            raise
        raise _offline_hint(name, error) from error


def _create_model(name: str, *, num_classes: int, in_chans: int, img_size: int, pretrained: bool,
                  **kwargs: object) -> nn.Module:
    if name.startswith("tv:"):
        import torchvision

        tv_name = name[3:]
        if pretrained:
            model = torchvision.models.get_model(tv_name, weights="DEFAULT")
            if num_classes != 1000:
                _replace_last_linear(model, num_classes)
        else:
            model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
        if in_chans != 3:
            raise ValueError(f"{name}: torchvision models take 3-channel images; use a timm model for in_chans="
                             f"{in_chans}")
        return model
    try:  # ViTs and the MLP need the input size; CNNs do not take it
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                 img_size=img_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
