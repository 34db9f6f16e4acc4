"""Module paths of dst_prune 0.2 that moved into subpackages keep importing, with a `DeprecationWarning`.

`import dst_prune.sparsity` (or `from dst_prune.distributed_checkpoint import save`) gives the module at its
new path (`dst_prune.controller.controller`, `dst_prune.distributed.checkpoint`): the same module object,
so classes and functions are identical whichever path imported them. A finder placed first on
`sys.meta_path` answers for the old names only; every other import is untouched.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

#: old module path -> new module path (a package's old path covers its submodules too)
MOVED = {
    "dst_prune.activation": "dst_prune.compat.activation",
    "dst_prune.bits": "dst_prune._bits",
    "dst_prune.condensed": "dst_prune.exporting.condensed",
    "dst_prune.context": "dst_prune.algorithms.context",
    "dst_prune.controller_state": "dst_prune.controller._state",
    "dst_prune.copies": "dst_prune.controller._copies",
    "dst_prune.distributed_checkpoint": "dst_prune.distributed.checkpoint",
    "dst_prune.distributions": "dst_prune.budget.distributions",
    "dst_prune.dsmodel": "dst_prune.compat.dsmodel",
    "dst_prune.gradients": "dst_prune._masking.gradients",
    "dst_prune.initialization": "dst_prune.budget.initialization",
    "dst_prune.masked_weight": "dst_prune._masking.masked_weight",
    "dst_prune.masking": "dst_prune._masking.hook",
    "dst_prune.models": "dst_prune.compat.models",
    "dst_prune.optimizer_state": "dst_prune._optimizer_state",
    "dst_prune.readers": "dst_prune._masking.readers",
    "dst_prune.scores": "dst_prune._scores",
    "dst_prune.selection": "dst_prune._selection",
    "dst_prune.sharding": "dst_prune.distributed.fsdp",
    "dst_prune.shrink": "dst_prune.exporting.shrink",
    "dst_prune.sparse_target": "dst_prune._masking.target",
    "dst_prune.sparsity": "dst_prune.controller",
    "dst_prune.stats": "dst_prune.reports",
    "dst_prune.validation": "dst_prune._validation",
    "dst_prune.integrations.checkpoints": "dst_prune.training.checkpoints",
    "dst_prune.integrations.data": "dst_prune.training.data",
    "dst_prune.integrations.datasets": "dst_prune.training.datasets",
    "dst_prune.integrations.models": "dst_prune.training.models",
    "dst_prune.integrations.plots": "dst_prune.training.plots",
    "dst_prune.integrations.run_log": "dst_prune.training.run_log",
    "dst_prune.integrations.timm_models": "dst_prune.training.timm_models",
}


def new_path(name: str) -> str | None:
    """The current path of the module once imported as `name`, or None if `name` did not move."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths in `MOVED` and loads them as the module at the new path."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if new_path(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = new_path(spec.name)
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path will be removed in "
                      f"dst_prune 1.0).", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already imported."""


def install() -> None:
    """Put the finder first on `sys.meta_path` (once): an old submodule path must not load a second copy."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())
