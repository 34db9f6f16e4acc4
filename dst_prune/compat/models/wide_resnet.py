"""Wide residual networks for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k: a 3x3 stem conv (16 channels), three groups of `(d - 4) / 6` pre-activation basic blocks with
16k, 32k and 64k channels (strides 1, 2, 2), then BN-ReLU, global average pooling and a linear
classifier. A block whose width or stride changes has a 1x1 `shortcut` conv, which the DSR paper keeps
dense (`exclude=["shortcut.weight"]`). WRN-28-2 is the DSR paper's CIFAR-10 network.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WideResNet", "wide_resnet"]


class WideBasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, width: int = 2, num_classes: int = 10, in_chans: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4; received {depth}")
        blocks = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, 1, 1, bias=False)
        layers = []
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(blocks):
                layers.append(WideBasicBlock(channels[group] if i == 0 else channels[group + 1], channels[group + 1],
                                             stride if i == 0 else 1, dropout))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.pretrained_cfg = {"first_conv": "conv1", "classifier": "fc"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def wide_resnet(depth: int = 28, width: int = 2, num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-`depth`-`width` for 32x32 images."""
    return WideResNet(depth, width, num_classes, **kwargs)
