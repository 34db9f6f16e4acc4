"""dst_prune's models (the seed's) for timm's registry: after `register_timm_models()` (which
`dst_prune.training.models.create_model` calls), `timm.create_model` and `scripts/train.py` find them.

| name | model |
| --- | --- |
| `lenet_300_100` | LeNet-300-100 for `in_chans x img_size x img_size` inputs (MNIST) |
| `wrn_28_2`, `wrn_28_10`, `wrn_16_8` | wide ResNets for CIFAR |
| `cifar_resnet20/32/44/56/110` | CIFAR ResNets; spatial bottlenecks: `sb_mode` (structured/static/dynamic), `sb_q` |
| `i1k_resnet50` | torchvision's ResNet-50 for ImageNet |
| `char_lstm` | a 2-layer character LSTM language model (`vocab_size`, `hidden_size`) |
"""

from __future__ import annotations

import timm
from timm.models import register_model
from torch import nn

from ..compat.models import CharRNN, cifar_resnet, wide_resnet
from ..compat.models import lenet_300_100 as _lenet

__all__ = ["MODELS", "register_timm_models"]


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights")


def lenet_300_100(pretrained: bool = False, num_classes: int = 10, in_chans: int = 1, img_size: int = 28,
                  **kwargs) -> nn.Module:
    """LeNet-300-100 for `in_chans x img_size x img_size` inputs (MNIST: 1 x 28 x 28)."""
    _no_pretrained("lenet_300_100", pretrained)
    return _lenet(in_chans * img_size * img_size, num_classes)


def i1k_resnet50(pretrained: bool = False, num_classes: int = 1000, **kwargs) -> nn.Module:
    """torchvision's ResNet-50 (the DSR paper's ImageNet network); pretrained weights from its cache."""
    import torchvision

    return torchvision.models.resnet50(weights="DEFAULT" if pretrained else None, num_classes=num_classes)


def char_lstm(pretrained: bool = False, num_classes: int | None = None, vocab_size: int = 65,
              hidden_size: int = 256, **kwargs) -> nn.Module:
    """A 2-layer character LSTM language model over `vocab_size` characters."""
    _no_pretrained("char_lstm", pretrained)
    return CharRNN(num_classes or vocab_size, hidden_size=hidden_size, depth=2, cell="lstm")


def _wrn(depth: int, width: int) -> object:
    def factory(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
        _no_pretrained(factory.__name__, pretrained)
        return wide_resnet(depth, width, num_classes, in_chans=in_chans, dropout=kwargs.get("drop_rate", 0.0))

    factory.__name__ = f"wrn_{depth}_{width}"
    factory.__doc__ = f"WRN-{depth}-{width} for CIFAR (Zagoruyko & Komodakis 2016)."
    return factory


def _cifar_resnet(depth: int) -> object:
    def factory(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, sb_mode: str | None = None,
                sb_q: int = 1, **kwargs) -> nn.Module:
        _no_pretrained(factory.__name__, pretrained)
        return cifar_resnet(depth, num_classes, in_chans=in_chans, sb_mode=sb_mode, sb_q=sb_q)

    factory.__name__ = f"cifar_resnet{depth}"
    factory.__doc__ = f"ResNet-{depth} for CIFAR (He et al. 2016), optionally with spatial bottlenecks."
    return factory


FACTORIES = [lenet_300_100, *(_wrn(d, w) for d, w in ((28, 2), (28, 10), (16, 8))),
             *(_cifar_resnet(d) for d in (20, 32, 44, 56, 110)), i1k_resnet50, char_lstm]
MODELS = [factory.__name__ for factory in FACTORIES]


def register_timm_models() -> list[str]:
    """Register every model of `MODELS` with timm's registry (once; later calls change nothing). Returns `MODELS`."""
    for factory in FACTORIES:
        if not timm.models.is_model(factory.__name__):
            register_model(factory)
    return MODELS
