"""The bookkeeping every DST algorithm shares; an algorithm only decides which positions to prune and grow.

`prune` and `grow` write the bool masks in place and keep the invariants of DESIGN.md: pruned
weights are zeroed in `weight_orig`, regrown ones start at zero, the gradient and every optimizer
state tensor of the parameter's shape are zeroed at both, and the effective `weight` is recomputed.
Random choices come from `generator(layer)`, seeded from `(seed, update index, layer)` only, so every
rank of a distributed run and every resumed run draws the same masks.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..errors import DSTError
from ..masking import SparseTarget, unwrap_optimizer, zero_positions

if TYPE_CHECKING:
    from ..sparsity import DynamicSparsity

__all__ = ["SparseAlgorithm", "derive_seed"]

GROWTH_STREAM, INIT_STREAM = 0, 1


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class SparseAlgorithm:
    """Base class of the DST algorithms (`method=` of `dst_prune.apply`).

    A subclass sets `name`, takes its hyperparameters as keyword arguments of `__init__` (validated
    there, before the model is touched) and implements `reparameterize`.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.controller: DynamicSparsity | None = None

    @classmethod
    def hyperparameters(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def create(cls, **hyperparameters: object) -> SparseAlgorithm:
        """Build the algorithm, refusing unknown hyperparameters with the list of valid ones."""
        unknown = sorted(set(hyperparameters) - set(cls.hyperparameters()))
        if unknown:
            valid = ", ".join(cls.hyperparameters()) or "none"
            raise DSTError(f"method={cls.name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                           f"valid ones: {valid}.")
        return cls(**hyperparameters)

    def bind(self, controller: DynamicSparsity) -> None:
        self.controller = controller

    # --- the parts a subclass implements -------------------------------------------------------
    def reparameterize(self) -> None:
        """One reallocation of the non-zero budget. Must keep the total number of active weights."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # --- bookkeeping ---------------------------------------------------------------------------
    @property
    def targets(self) -> list[SparseTarget]:
        return self.controller.targets

    def generator(self, layer: int) -> torch.Generator:
        """The generator for `layer` in the current update; depends only on (seed, update index, layer)."""
        target = self.targets[layer]
        seed = derive_seed(self.controller.seed, GROWTH_STREAM, self.controller.update_index, layer)
        return torch.Generator(device=target.mask.device).manual_seed(seed)

    def prune(self, layer: int, positions: torch.Tensor) -> int:
        """Deactivate the active weights of `layer` at `positions` (bool, the parameter's shape)."""
        target = self.targets[layer]
        positions = positions & target.mask
        count = int(positions.sum())
        if count:
            target.mask.masked_fill_(positions, False)
            zero_positions(target, positions, unwrap_optimizer(self.controller.optimizer))
            target.refresh()
        self.controller.record_change(layer, pruned=count)
        return count

    def grow(self, layer: int, positions: torch.Tensor) -> int:
        """Activate the inactive weights of `layer` at `positions`, starting at zero with zero state."""
        target = self.targets[layer]
        positions = positions & ~target.mask
        count = int(positions.sum())
        if count:
            target.mask.masked_fill_(positions, True)
            zero_positions(target, positions, unwrap_optimizer(self.controller.optimizer))
            target.refresh()
        self.controller.record_change(layer, grown=count)
        return count
