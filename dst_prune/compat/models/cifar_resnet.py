"""CIFAR ResNets (He et al. 2016, sec. 4.2) with optional spatial bottlenecks (Peng et al. 2018).

ResNet-d, d = 6n + 2 (20, 32, 44, 56, 110): a 3x3 stem conv with 16 channels, three stages of n basic
blocks with 16, 32 and 64 channels (strides 1, 2, 2), global average pooling and a linear classifier.
Shortcuts are parameter-free (option A: subsample and zero-pad the channels), as in the paper.

With `sb_mode`, each block's first BatchNorm becomes a `SparseBatchNorm`: the activation after the
block's first conv is masked spatially (`structured`: the spatial bottleneck's checkerboard; `static`
or `dynamic`: random masks of the same density) at density `0.25 * sb_q`, and normalized over the kept
positions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from ..activation import SparseBatchNorm

__all__ = ["CifarResNet", "cifar_resnet"]


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, sb_mode: str | None, density: float,
                 seed: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = SparseBatchNorm(sb_mode, density, planes, seed=seed) if sb_mode else nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        return functional.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, sb_mode: str | None = None,
                 sb_q: int = 1) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110); received {depth}")
        if sb_mode is not None and sb_q not in (1, 2, 3):
            raise ValueError(f"sb_q must be 1, 2 or 3 (density 0.25 * q); received {sb_q}")
        blocks, planes, layers = (depth - 2) // 6, 16, []
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        for stage, width in enumerate((16, 32, 64)):
            for i in range(blocks):
                stride = 2 if stage and i == 0 else 1
                layers.append(CifarBasicBlock(planes, width, stride, sb_mode, 0.25 * sb_q, seed=len(layers)))
                planes = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.pretrained_cfg = {"first_conv": "conv1", "classifier": "fc"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def cifar_resnet(depth: int = 20, num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-`depth` for 32x32 images; `sb_mode`/`sb_q` for spatial bottlenecks."""
    return CifarResNet(depth, num_classes, **kwargs)
