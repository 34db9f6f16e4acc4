"""The seed's models."""

from .lenet import lenet_300_100

__all__ = ["lenet_300_100"]
