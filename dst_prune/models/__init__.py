"""The seed's models: LeNet-300-100 (MNIST) and wide ResNets for CIFAR."""

from .lenet import lenet_300_100
from .wide_resnet import WideResNet, wide_resnet

__all__ = ["WideResNet", "lenet_300_100", "wide_resnet"]
