"""Structured RigL, SRigL (Lasby et al., ICLR 2024, "Dynamic Sparse Training with Structured Sparsity")."""

from __future__ import annotations

import dataclasses
import math

import torch

from .._scores import all_finite, finite_scores
from .._selection import Outside, nonzero_indices, top_k_indices, top_k_mask, top_k_outside
from .._validation import check_int, check_number
from ..errors import DSTError
from ..groups import Grouping, top_k_per_block
from .fan_in import from_rows, neurons_for, plan_fan_in, row_sums, rows_of, top_k_per_row
from .registry import register_method
from .rigl import RigL

__all__ = ["SRigL"]


@register_method("srigl")
@dataclasses.dataclass(eq=False, kw_only=True)
class SRigL(RigL):
    """SRigL: RigL with a constant fan-in per neuron and ablation of neurons with too few salient weights.

    Lasby et al. 2024 (the SRigL method: constant fan-in and neuron ablation; its Algorithm 1). Every sparse
    layer `l` (a Linear: per output row; a convolution: per output channel, over `in/groups x kh x kw`) holds
    `n_l` active neurons with exactly `k_l` active weights each (constant fan-in), and the other neurons
    ablated. Every `update_every` steps until `T_end` (RigL's schedule), in each layer with budget `B = n k`:

    1. RigL's layer-wise decision (Evci et al. 2020, eq. 1): `K = floor(f(t) B)` with `f(t) = alpha / 2 *
       (1 + cos(pi t / T_end))`; the `B - K` largest `|w|` among the active weights are *kept* and the `K`
       largest `|dL/dW|` among the other positions would be *grown*.
    2. Saliency (the paper's neuron ablation): the salient weights of neuron `r` are its kept ones and those
       with a positive gradient among the would-be grown ones; `s_r` is their number.
    3. Neuron ablation: neuron `r` stays active iff `s_r >= max(min_salient_weights,
       ceil(gamma_sal * k))`; at least `ceil(B / fan_in)` neurons stay (a row holds at most `fan_in`).
       Ablated neurons lose all their weights; the active ones' fan-in grows to `k' = B / n'` so the layer
       keeps its budget exactly. `n'` must divide `B`: it is the smallest divisor of `B` at or above the
       count the criterion keeps (`fan_in.neurons_for`), the extra ones being the most salient failing
       neurons (then by kept magnitude, then lower index). The criterion is evaluated for every neuron at
       every update, so an ablated neuron with large gradients comes back (at zero).
    4. Per neuron regrowth (Algorithm 1): each active neuron keeps its kept weights (at most `k'`, by `|w|`)
       and grows `k' - kept` at its positions of largest `|dL/dW|` (just-dropped ones included; they keep
       their weights, new ones start at zero with zero optimizer state), so every active neuron ends with
       exactly `k'` weights.

    The initial masks (`apply`) have constant fan-in too: the distribution's per-layer counts are split
    as `n * k` by `fan_in.plan_fan_in` (exact global total; see there), and each active neuron keeps its
    `k` best by `init`. Only `granularity="element"` applies (the fan-in counts single weights).

    Args:
        drop_fraction: `alpha`, RigL's initial fraction of each layer's active weights replaced (0.3).
        decay: `cosine` (the paper, as RigL), `linear` or `constant`.
        gamma_sal: the ablation threshold `gamma_sal` of the paper: the fraction of its fan-in `k` a neuron
            must hold as salient weights to stay active (0.3, the paper's choice for CNNs; 0 with
            `min_salient_weights=0` turns ablation off).
        min_salient_weights: the fewest salient weights an active neuron may have, whatever its fan-in (1).
    """

    gamma_sal: float = 0.3
    min_salient_weights: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gamma_sal = check_number(self.gamma_sal, "gamma_sal", low=0.0, high=1.0, high_open=False)
        self.min_salient_weights = check_int(self.min_salient_weights, "min_salient_weights",
                                             what="salient weights a neuron keeps to stay active")
        self.active_neurons: list[int] = []

    # --- apply: constant fan-in from the start -------------------------------------------------------
    def initial_groups(self, specs: list, groupings: list, scores: list[torch.Tensor],
                       chosen: list[torch.Tensor]) -> list[torch.Tensor]:
        for spec, grouping in zip(specs, groupings):
            if type(grouping) is not Grouping:
                raise DSTError(f"method='srigl' keeps a constant fan-in of single weights per neuron; granularity "
                               f"must be 'element' (received {grouping.name!r}).")
            if len(grouping.shape) < 2:
                raise DSTError(f"method='srigl' needs weights with an output and an input dimension; {spec.name} has "
                               f"shape {tuple(grouping.shape)}. Exclude it (exclude=[{spec.name!r}]).")
        outs = [g.shape[s.layout[0]] for s, g in zip(specs, groupings)]
        fans = [g.n_groups // out for g, out in zip(groupings, outs)]
        plan = plan_fan_in([int(c.sum()) for c in chosen], outs, fans, [s.name for s in specs])
        return [self._constant_fan_in(score, spec.layout[0], n, k)
                for score, spec, (n, k) in zip(scores, specs, plan)]

    @staticmethod
    def _constant_fan_in(scores: torch.Tensor, out_dim: int, neurons: int, fan_in: int) -> torch.Tensor:
        """The `fan_in` best positions (ties: lower index) of the `neurons` rows with the best such sum."""
        rows = rows_of(scores.float(), out_dim)
        best = top_k_per_block(rows, torch.full((rows.shape[0],), fan_in))
        strength = torch.where(best, rows, 0.0).double().sum(1)
        keep = top_k_mask(strength, neurons)
        return from_rows(best & keep.unsqueeze(1), scores.shape, out_dim)

    # --- updates ---------------------------------------------------------------------------------------
    def check_ready(self) -> None:
        """Refuse masks without a constant fan-in (loaded from another method), naming the layer."""
        for target in self.targets:
            counts = row_sums(rows_of(target.mask, target.grouping.layout[0]))
            active = counts[counts > 0]
            if active.numel() and int(active.min()) != int(active.max()):
                raise DSTError(f"the mask of {target.name} has {int(active.min())} to {int(active.max())} active "
                               f"weights per active neuron; method='srigl' keeps a constant fan-in. Start from "
                               f"dst_prune.apply(model, method='srigl', ...) or load a srigl checkpoint.")

    def exchange(self, fraction: float) -> None:
        """Steps 1-4 of the class docstring in every layer (the budget never moves between layers)."""
        self.active_neurons = [self._update_layer(layer, fraction) for layer in range(len(self.targets))]

    def _threshold(self, fan_in: int) -> int:
        """The salient weights a neuron of fan-in `fan_in` needs to stay active (step 3)."""
        return max(self.min_salient_weights, math.ceil(self.gamma_sal * fan_in - 1e-9))

    def _update_layer(self, layer: int, fraction: float) -> int:
        """Steps 1-4 in `layer`; returns its active neurons. Rankings run among the weights that take part (the
        active ones to keep, the others to grow), without full-size masked copies or full sorts of the rows."""
        target = self.targets[layer]
        out_dim, shape = target.grouping.layout[0], target.shape
        mask = rows_of(target.mask, out_dim)
        out, fan = mask.shape
        active_indices = nonzero_indices(mask, self.context.active_groups(layer))
        budget = active_indices.numel()
        row_counts = torch.bincount(active_indices // fan, minlength=out)
        fan_in = budget // max(1, int(torch.count_nonzero(row_counts)))
        finite = all_finite(target.orig)
        magnitude = rows_of(finite_scores(target.orig.detach().abs(), target.name), out_dim)
        gradient = rows_of(self.gradients[layer].abs().float(), out_dim)  # finite: all-reduced and checked
        drops = min(int(fraction * budget), budget - 1)
        # 1. RigL's layer-wise keep (the budget - drops largest |w| of the active, ties: the lower index kept, so the
        #    dropped are the smallest, ties: the higher index) and would-be growth (the drops largest |dL/dW| outside)
        values = magnitude.reshape(-1).index_select(0, active_indices)
        weakest = top_k_indices(values.flip(0).neg_(), drops)  # (reversed: ties go to the higher index)
        dropped = active_indices.index_select(0, budget - 1 - weakest)
        kept = mask.reshape(-1).clone().index_fill_(0, dropped, False).view(out, fan)
        growth = top_k_outside(gradient, drops, Outside(kept, active=budget - drops))
        growth = growth[gradient.reshape(-1).index_select(0, growth) > 0]
        # 2-3. saliency and ablation
        kept_counts = row_counts - torch.bincount(dropped // fan, minlength=out)
        salient = kept_counts + torch.bincount(growth // fan, minlength=out)
        passing = int((salient >= self._threshold(fan_in)).sum())
        neurons = neurons_for(budget, max(1, passing), out, fan)
        strength = _neuron_strengths(kept, magnitude, values, active_indices, budget - 1 - weakest)
        order = torch.sort(strength, descending=True, stable=True).indices
        order = order[torch.sort(salient[order], descending=True, stable=True).indices]
        active = torch.zeros(out, dtype=torch.bool, device=mask.device)
        active[order[:neurons]] = True
        # 4. per neuron: keep at most k' by |w|, grow the rest by |dL/dW|
        new_fan_in = budget // neurons
        kept &= active.unsqueeze(1)
        kept_counts = torch.where(active, kept_counts, 0)
        keep_counts = kept_counts.clamp(max=new_fan_in)
        over = (kept_counts > keep_counts).nonzero().view(-1)  # (elsewhere every kept weight stays)
        if over.numel():
            rows = kept.index_select(0, over)
            kept[over] = top_k_per_row(magnitude.index_select(0, over).masked_fill(~rows, float("-inf")),
                                       keep_counts.index_select(0, over))
        grow_counts = torch.where(active, new_fan_in - keep_counts, 0)
        new = kept | top_k_per_row(gradient.masked_fill(kept, float("-inf")), grow_counts)
        self._write(layer, from_rows(new, shape, out_dim), finite)
        return neurons

    def _write(self, layer: int, new: torch.Tensor, finite: bool | None = None) -> None:
        """Make `new` (bool, the weight's shape) the mask of `layer` through the context's recorded writes.

        A position kept whose weight is not finite restarts at zero (pruned and grown), as in `DropAndGrow`
        (`finite`: whether all weights are, if known).
        """
        target = self.targets[layer]
        old, orig = target.mask, target.orig.detach()
        changed = nonzero_indices(old != new)
        was_active = old.reshape(-1).index_select(0, changed)
        pruned, grown = changed[was_active], changed[~was_active]
        broken = changed[:0]
        if not (all_finite(orig) if finite is None else finite):
            broken = (old & new & ~torch.isfinite(orig)).reshape(-1).nonzero().view(-1)
        self.set_indices(layer, torch.cat([pruned, broken]), False)
        self.set_indices(layer, torch.cat([grown, broken]), True)

    def metrics(self) -> dict:
        outs = [rows_of(t.mask, t.grouping.layout[0]).shape[0] for t in self.targets]
        return {**super().metrics(), "active_neurons": sum(self.active_neurons),
                "ablated_neurons": sum(outs) - sum(self.active_neurons)}


def _neuron_strengths(kept: torch.Tensor, magnitude: torch.Tensor, active_values: torch.Tensor,
                      active_indices: torch.Tensor, dropped_positions: torch.Tensor) -> torch.Tensor:
    """Per neuron (row of `kept`), the sum in float64 of the kept weights' magnitudes.

    On CPU over the kept weights only (`index_add_`: sequential, so the same on every rank); elsewhere as a row sum
    of the whole layer (CUDA's `index_add_` adds with atomics, whose order, and so whose last bits, vary, and
    ranks must rank neurons alike). `active_values`/`active_indices`: the magnitudes and flat indices of the active
    weights; `dropped_positions`: the positions in those of the weights dropped.
    """
    if kept.device.type != "cpu":
        return torch.where(kept, magnitude, 0.0).sum(1, dtype=torch.float64)
    staying = torch.ones(active_indices.numel(), dtype=torch.bool, device=kept.device)
    staying.index_fill_(0, dropped_positions, False)
    return torch.zeros(kept.shape[0], dtype=torch.float64, device=kept.device).index_add_(
        0, active_indices[staying] // kept.shape[1], active_values[staying].double())
