"""List the module classes of torch, torchvision and timm whose forward reads a child's weight directly.

Such a parent bypasses the child's forward pre-hook, so a pruned child would be seen with a stale
weight. dst_prune finds these parents in a model by the same source scan (`masking.direct_readers`)
and gives each a pre-hook that recomputes the child's masked weight first. This script surveys the
libraries, to check that the scan sees every known case:

    python scripts/find_weight_readers.py
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

from torch import nn

from dst_prune._masking.readers import _METADATA, _attribute_chains

WEIGHT = re.compile(r"^(weight|in_proj_weight|[qkv]_proj_weight|weight_(ih|hh|hr)_l\d+(_reverse)?)$")


def classes(package: str):
    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:  # optional dependencies of some submodules
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == name:
                yield cls


def reads(cls: type) -> list[str]:
    found = set()
    for chain in _attribute_chains(cls):
        parts = chain.split(".")
        for cut in range(1, len(parts)):
            following = parts[cut + 1] if cut + 1 < len(parts) else None
            if WEIGHT.match(parts[cut]) and following not in _METADATA:
                found.add(".".join(parts[: cut + 1]))
    return sorted(found)


def main() -> None:
    for package in ("torch.nn.modules", "torchvision.models", "timm.models", "timm.layers"):
        for cls in sorted(set(classes(package)), key=lambda c: (c.__module__, c.__name__)):
            chains = reads(cls)
            if chains:
                print(f"{cls.__module__}.{cls.__name__}: {', '.join(chains)}")


if __name__ == "__main__":
    main()
