"""Activation sparsity: binary spatial masks on activations, and batch normalization over the kept positions.

`SparseActivation` multiplies a dense activation `x` of shape `(N, C, *spatial)` by a binary mask of
shape `spatial`, shared across the batch and the channels (for `(N, F)` inputs the mask is over `F`):

- `static`: one random mask with exactly `round(density * size)` ones, drawn once (at construction when
  `size` is given, else at the first forward) and kept (a buffer, saved with the model);
- `dynamic`: a new random mask at every training forward; at evaluation the input is multiplied by the
  density, the expected value of the mask;
- `structured`: the checkerboard of the spatial bottleneck (Peng et al. 2018, "Spatial bottleneck":
  strided sampling): density 1/4 keeps even rows and even columns, 1/2 alternates, 3/4 drops the odd
  rows' odd columns.

`SparseBatchNorm` is a `SparseActivation` followed by batch normalization whose statistics are computed
over the kept positions only; the dropped positions stay zero, so they get no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from .._selection import top_k_mask
from ..errors import DSTError

__all__ = ["MODES", "SparseActivation", "SparseBatchNorm", "checkerboard"]

MODES = ("static", "dynamic", "structured")


def checkerboard(size: tuple[int, ...], density: float) -> torch.Tensor:
    """The spatial bottleneck's strided pattern over the last two dims of `size` (density 1/4, 1/2, 3/4, 1)."""
    quarters = round(density * 4)
    if abs(density * 4 - quarters) > 1e-9 or quarters not in (1, 2, 3, 4):
        raise DSTError(f"density={density} is not a structured (checkerboard) density; valid: 0.25, 0.5, 0.75, 1.")
    rows = torch.arange(size[-2]).view(-1, 1) % 2
    cols = torch.arange(size[-1]).view(1, -1) % 2
    pattern = {1: (rows == 0) & (cols == 0), 2: (rows + cols) % 2 == 0, 3: ~((rows == 1) & (cols == 1)),
               4: torch.ones_like(rows + cols, dtype=torch.bool)}[quarters]
    return pattern.expand(*size[:-2], *pattern.shape).clone()


def _random_mask(size: tuple[int, ...], density: float, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    scores = torch.rand(size, generator=generator, device=device if generator is None else generator.device)
    return top_k_mask(scores, round(density * scores.numel())).to(device)


class SparseActivation(nn.Module):
    """Multiply an activation by a binary spatial mask (see the module docstring).

    Args:
        mode: `static`, `dynamic` or `structured`.
        density: the fraction of positions kept, in (0, 1].
        size: the spatial size, to draw a static mask at construction (else at the first forward).
        norm_p: if set, each forward stores `self.norm`, the L`p` norm of the output, with its graph: add
            `coefficient * module.norm` to the loss as a sparsity-inducing regularization term.
        seed: seeds the static mask (the dynamic one uses torch's global generator, like dropout).

    Attributes:
        achieved_sparsity: the fraction of zeros in the last output (the mask's and the input's own zeros).
    """

    def __init__(self, mode: str = "dynamic", density: float = 0.5, size: tuple[int, ...] | None = None,
                 norm_p: float | None = None, seed: int = 0) -> None:
        super().__init__()
        if mode not in MODES:
            raise DSTError(f"mode={mode!r} is unknown; valid choices: {', '.join(MODES)}.")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise DSTError(f"density must be a number in (0, 1]; received {density!r}.")
        if mode == "structured":
            checkerboard((2, 2), density)  # validates the density
        self.mode, self.density, self.norm_p, self.seed = mode, float(density), norm_p, seed
        self.register_buffer("mask", None)
        if size is not None and mode != "dynamic":
            self.mask = self._fixed_mask(tuple(size), torch.device("cpu"))
        self.achieved_sparsity: float | None = None
        self.norm: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, density={self.density}"

    def _fixed_mask(self, size: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if self.mode == "structured":
            return checkerboard(size, self.density).to(device)
        return _random_mask(size, self.density, torch.Generator().manual_seed(self.seed), device)

    @staticmethod
    def spatial_size(x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape[2:]) if x.ndim > 2 else tuple(x.shape[1:])

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The bool mask applied to `x` (broadcastable), or None for a dynamic module in evaluation."""
        size = self.spatial_size(x)
        if self.mode == "dynamic":
            return _random_mask(size, self.density, None, x.device) if self.training else None
        if self.mask is None or tuple(self.mask.shape) != size:
            if self.mask is not None:
                raise DSTError(f"SparseActivation: its {self.mode} mask has size {tuple(self.mask.shape)}, the "
                               f"input's spatial size is {size}. A fixed mask needs a fixed input size.")
            self.mask = self._fixed_mask(size, x.device)
        return self.mask.to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask_for(x)
        output = x * self.density if mask is None else x * mask
        self.record(output)
        return output

    def record(self, output: torch.Tensor) -> None:
        """Book-keeping: the achieved sparsity, and the regularization norm when `norm_p` is set."""
        with torch.no_grad():
            self.achieved_sparsity = 1.0 - float(torch.count_nonzero(output)) / max(1, output.numel())
        if self.norm_p is not None:
            self.norm = output.abs().pow(self.norm_p).sum().pow(1.0 / self.norm_p)


class SparseBatchNorm(nn.Module):
    """A `SparseActivation` followed by batch normalization over the kept positions only.

    In training the per-channel mean and variance are those of the kept positions of the batch; running
    statistics are updated from them (unbiased variance, as `nn.BatchNorm2d`). The output is zero at
    the dropped positions, which therefore get no gradient. A dynamic module in evaluation normalizes
    every position with the running statistics.

    Args:
        mode, density, size, seed: as `SparseActivation`.
        num_features: the number of channels `C` of the `(N, C, *spatial)` input.
        eps, momentum, affine: as `nn.BatchNorm2d`.
    """

    def __init__(self, mode: str = "dynamic", density: float = 0.5, num_features: int = 0, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, size: tuple[int, ...] | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise DSTError(f"num_features must be the (positive) number of channels; received {num_features!r}.")
        self.sparse = SparseActivation(mode, density, size=size, seed=seed)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, mode={self.sparse.mode!r}, density={self.sparse.density}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise DSTError(f"SparseBatchNorm normalizes (N, C, *spatial) activations; received shape {tuple(x.shape)}.")
        shape, reduce = (1, -1) + (1,) * (x.ndim - 2), [0, *range(2, x.ndim)]
        mask = self.sparse.mask_for(x)
        keep = None if mask is None else mask.to(x.dtype)  # (*spatial), broadcast over batch and channels
        if self.training:  # a training forward always has a mask
            count = x.shape[0] * keep.sum()
            mean = (x * keep).sum(reduce) / count
            var = ((x - mean.view(shape)) ** 2 * keep).sum(reduce) / count
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * count / (count - 1).clamp(min=1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        output = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if keep is not None:
            output = output * keep
        self.sparse.record(output)
        return output
