"""Build a model by name for `scripts/train.py`: timm names, torchvision's (`tv:resnet50`) and dst_prune's own.

dst_prune's models (`dst_prune.models`) are registered with timm's registry on import of this module, so
`timm.create_model("lenet_300_100")` finds them too.
"""

from __future__ import annotations

import timm
from timm.models import register_model
from torch import nn

from dst_prune.models import lenet_300_100 as _lenet_300_100
from dst_prune.models import wide_resnet

__all__ = ["create_model"]


@register_model
def lenet_300_100(pretrained: bool = False, num_classes: int = 10, in_chans: int = 1, img_size: int = 28,
                  **kwargs) -> nn.Module:
    """LeNet-300-100 for `in_chans x img_size x img_size` inputs (MNIST: 1 x 28 x 28)."""
    if pretrained:
        raise ValueError("lenet_300_100 has no pretrained weights")
    return _lenet_300_100(in_chans * img_size * img_size, num_classes)


def _wrn(depth: int, width: int):
    def factory(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(f"wrn_{depth}_{width} has no pretrained weights")
        return wide_resnet(depth, width, num_classes, in_chans=in_chans, dropout=kwargs.get("drop_rate", 0.0))

    factory.__name__ = f"wrn_{depth}_{width}"
    factory.__doc__ = f"WRN-{depth}-{width} for CIFAR (Zagoruyko & Komodakis 2016)."
    return factory


for _depth, _width in ((28, 2), (28, 10), (16, 8)):
    register_model(_wrn(_depth, _width))


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    name, last = next((n, m) for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear))
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def create_model(name: str, *, num_classes: int, in_chans: int = 3, img_size: int = 224,
                 pretrained: bool = False) -> nn.Module:
    """A model from timm (`resnet50`, `vit_small_patch16_224`, `lenet_300_100`, ...) or torchvision (`tv:...`).

    With `pretrained`, weights come from timm's/torchvision's caches (nothing here downloads); a
    torchvision classifier is replaced when `num_classes` differs from the weights' 1000.
    """
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
                                 img_size=img_size)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
