"""The seed's models: LeNet-300-100 (MNIST), wide ResNets and ResNets with spatial bottlenecks (CIFAR), char-RNN.

`import dst_prune.training.models` registers them with timm's registry (`timm.create_model("wrn_28_2")`).
"""

from .char_rnn import CharRNN
from .cifar_resnet import CifarResNet, cifar_resnet
from .lenet import lenet_300_100
from .wide_resnet import WideResNet, wide_resnet

__all__ = ["CharRNN", "CifarResNet", "WideResNet", "cifar_resnet", "lenet_300_100", "wide_resnet"]
