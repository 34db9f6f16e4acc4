"""Inference copies of a sparse model: `dst_prune.export(model, format=...)` (`formats`), the condensed constant
fan-in layers (`condensed`) and the physically smaller model of pruned channels (`shrink`)."""

from .formats import CSRLinear, export

__all__ = ["CSRLinear", "export"]
