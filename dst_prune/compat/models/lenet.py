"""LeNet-300-100 (LeCun et al. 1998), the MNIST MLP of the DSR paper (Mostafa & Wang 2019, sec. 4.1)."""

from __future__ import annotations

from torch import nn

__all__ = ["lenet_300_100"]


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """Flatten, then Linear(in, 300), ReLU, Linear(300, 100), ReLU, Linear(100, classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, num_classes))
