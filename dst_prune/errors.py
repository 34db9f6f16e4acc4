"""The one exception type of dst_prune."""

from __future__ import annotations

__all__ = ["DSTError"]


class DSTError(ValueError):
    """Bad input to dst_prune.

    Raised before anything is modified: when `apply` raises it, the model is exactly as it was.
    The message names the argument or the parameter (`layer1.0.conv1.weight`), says what was
    received and what was expected, and how to fix it.
    """
