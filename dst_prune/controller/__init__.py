"""`DynamicSparsity`, the controller `dst_prune.apply` returns, and the parts it is composed of."""

from .controller import DynamicSparsity

__all__ = ["DynamicSparsity"]
