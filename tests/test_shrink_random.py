"""Randomized equivalence of `export(format="shrink")`: small random graphs with random pruned channels.

Each case is a seeded random program over Linear/Conv2d layers, BatchNorm, activations, pools, flatten and
views, residual additions, concatenations, permutes, layers called twice, and Linear layers over a non-channel
dimension; its layers are made sparse with `granularity="channel"` and then edited without training (producers
that feed one shared layer get the same pruned channels and biases; random extra channels are pruned or
revived). Every export must either refuse with a `DSTError` that names a layer of the model and leave the
model unchanged, or compute what the model computes with fewer parameters.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.nn import functional as F

import dst_prune

CASES = 150
FUNCTIONS = {"F.relu": F.relu, "torch.sigmoid": torch.sigmoid, "F.silu": F.silu, "tanh": torch.tanh}


class RandomNet(nn.Module):
    """A straight-line program over `layers`: step i computes tensor i + 1 from earlier tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        self.program: list[tuple[str, tuple[int, ...], tuple]] = []
        self.outputs: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values = [x]
        for op, inputs, args in self.program:
            values.append(getattr(self, f"op_{op}")(*[values[i] for i in inputs], *args))
        outputs = tuple(values[i] for i in self.outputs)
        return outputs if len(outputs) > 1 else outputs[0]

    def op_layer(self, x, name):
        return self.layers[name](x)

    def op_function(self, x, name):
        return x.relu() if name == "method relu" else FUNCTIONS[name](x)

    def op_add(self, a, b):
        return a + b

    def op_mul(self, a, b):
        return a * b

    def op_scalar(self, x, scale, shift):
        return x * scale + shift

    def op_cat(self, a, b, dim):
        return torch.cat([a, b], dim)

    def op_flatten(self, x, how):
        if how == "torch.flatten":
            return torch.flatten(x, 1)
        if how == "view":
            return x.view(x.size(0), -1)
        if how == "reshape":
            return x.reshape(x.size(0), -1)
        return x.flatten(1)

    def op_mean(self, x, keepdim):
        return x.mean((2, 3), keepdim=keepdim)

    def op_permute(self, x, dims):
        return x.permute(*dims)

    def op_transpose(self, x, a, b):
        return x.transpose(a, b)

    def op_unsqueeze(self, x):
        return x.unsqueeze(-1).unsqueeze(-1)

    def op_relu_add(self, x):  # an in-place write into a tensor that is read again
        y = F.relu(x, inplace=True)
        return x + y

    def op_split(self, x):  # a reshape of the channels, which shrink cannot follow
        return x.reshape(x.size(0), 2, -1)


class Builder:
    """Builds a `RandomNet` step by step, running every step on an example to know the shapes."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        torch.manual_seed(seed)  # the layers' initial weights
        self.net = RandomNet()
        # one case in five is a short one around a known trap: a layer called on two producers, a Linear over the width
        self.motif = self.rng.choice(["shared", "over width"]) if self.rng.random() < 0.2 else None
        image = self.motif == "over width" or self.rng.random() < 0.65
        self.examples = [torch.randn(2, 3, 6, 6) if image else torch.randn(2, 10)]
        self.kinds: set[str] = set()
        self.twins: list[tuple[str, str]] = []
        self.shared_layers: list[str] = []
        self.width_layers: list[str] = []
        self.dense_layers: list[str] = []

    def emit(self, op: str, inputs: tuple[int, ...], *args: object, kind: str | None = None) -> int:
        self.net.program.append((op, inputs, args))
        with torch.no_grad():
            self.examples.append(getattr(self.net, f"op_{op}")(*[self.examples[i] for i in inputs], *args))
        self.kinds.add(kind or op)
        return len(self.examples) - 1

    def layer(self, module: nn.Module, x: int, kind: str | None = None) -> int:
        name = f"l{len(self.net.layers)}"
        self.net.layers[name] = module
        return self.emit("layer", (x,), name, kind=kind or type(module).__name__)

    def conv(self, x: int, out: int | None = None, same: bool = False) -> int:
        c, h = self.examples[x].shape[1], min(self.examples[x].shape[2:])
        kernel = 1 if h < 3 or self.rng.random() < 0.3 else 3
        padding = 1 if kernel == 3 and (same or self.rng.random() < 0.6) else 0
        mode = self.rng.choice(["zeros", "zeros", "reflect"]) if padding and h > 1 else "zeros"
        out = out or self.rng.choice([4, 6, 8])
        return self.layer(nn.Conv2d(c, out, kernel, padding=padding, bias=self.rng.random() < 0.7,
                                    padding_mode=mode), x)

    def linear(self, x: int, out: int | None = None) -> int:
        features = self.examples[x].shape[-1]
        return self.layer(nn.Linear(features, out or self.rng.choice([4, 6, 8])), x, kind="Linear")

    def activation(self, x: int) -> int:
        choice = self.rng.choice([nn.ReLU(), nn.ReLU(inplace=True), nn.GELU(), nn.Sigmoid(), nn.LeakyReLU(0.1),
                                  "F.relu", "torch.sigmoid", "F.silu", "tanh", "method relu"])
        if isinstance(choice, str):
            return self.emit("function", (x,), choice, kind="activation")
        return self.layer(choice, x, kind="activation")

    def project(self, x: int, out: int | None = None, same: bool = False) -> int:
        return self.conv(x, out, same) if self.examples[x].ndim == 4 else self.linear(x, out)

    def shared(self, x: int) -> int:
        """Two producers of the same shape feed one layer, called on each; the results are added."""
        width = self.rng.choice([4, 6])
        a, b = self.project(x, width, same=True), self.project(x, width, same=True)
        self.twins.append((self.net.program[a - 1][2][0], self.net.program[b - 1][2][0]))
        a, b = self.activation(a), self.activation(b)
        shared = self.project(a, same=True)
        name = self.net.program[shared - 1][2][0]
        self.shared_layers.append(name)
        second = self.emit("layer", (b,), name, kind="shared layer")
        return self.emit("add", (shared, second))

    def over_width(self, x: int) -> int:
        """A Linear over the width of an N,C,H,W map: not channel-indexed."""
        self.width_layers.append(f"l{len(self.net.layers)}")
        return self.layer(nn.Linear(self.examples[x].shape[-1], self.rng.choice([3, 5])), x, kind="Linear over width")

    def map_step(self, x: int) -> int:
        _, c, h, w = self.examples[x].shape
        choices = ["conv", "conv", "bn", "act", "act", "residual", "cat", "shared", "scalar", "permute", "over width",
                   "transpose", "mean keepdim", "gate", "in place", "avgpool", "adaptive"]
        choices += ["maxpool"] if min(h, w) >= 2 else []
        step = self.rng.choice(choices)
        if step == "conv":
            return self.conv(x)
        if step == "bn":
            return self.layer(nn.BatchNorm2d(c), x)
        if step == "act":
            return self.activation(x)
        if step == "residual":
            return self.emit("add", (x, self.activation(self.conv(x, c, same=True))), kind="residual add")
        if step == "cat":
            return self.emit("cat", (x, self.conv(x, same=True)), 1, kind="channel cat")
        if step == "shared":
            return self.shared(x)
        if step == "scalar":
            return self.emit("scalar", (x,), self.rng.choice([0.5, 2.0]), self.rng.choice([0.0, 1.0]))
        if step == "permute":  # a Linear over the channels of an N,H,W,C view: channel-indexed
            y = self.linear(self.emit("permute", (x,), (0, 2, 3, 1)))
            return self.emit("permute", (self.activation(y),), (0, 3, 1, 2), kind="permute back")
        if step == "over width":
            return self.over_width(x)
        if step == "in place":
            return self.emit("relu_add", (self.conv(x),), kind="in-place write")
        if step == "transpose":
            return self.emit("transpose", (x,), 2, 3)
        if step == "mean keepdim":
            return self.emit("mean", (x,), True, kind="mean keepdim")
        if step == "gate":  # squeeze-and-excitation: a product of two tracked tensors
            gate = self.emit("function", (self.conv(self.emit("mean", (x,), True), c),), "torch.sigmoid")
            return self.emit("mul", (x, gate), kind="gate")
        if step == "maxpool":
            return self.layer(nn.MaxPool2d(2), x)
        if step == "avgpool":
            return self.layer(nn.AvgPool2d(3, 1, 1), x, kind="padded avgpool")
        return self.layer(nn.AdaptiveAvgPool2d(self.rng.choice([1, 2])), x)

    def vector_step(self, x: int) -> int:
        features = self.examples[x].shape[-1]
        step = self.rng.choice(["linear", "linear", "bn", "act", "residual", "cat", "shared", "scalar", "unsqueeze",
                                "split"])
        if step == "linear":
            return self.linear(x)
        if step == "bn" and self.examples[x].ndim == 2:
            return self.layer(nn.BatchNorm1d(features), x)
        if step == "residual":
            return self.emit("add", (x, self.activation(self.linear(x, features))), kind="residual add")
        if step == "cat":
            return self.emit("cat", (self.linear(x), x), -1, kind="feature cat")
        if step == "shared":
            return self.shared(x)
        if step == "scalar":
            return self.emit("scalar", (x,), 0.5, 1.0)
        if step == "unsqueeze" and self.examples[x].ndim == 2:
            return self.emit("unsqueeze", (x,))
        if step == "split" and self.examples[x].ndim == 2 and features % 2 == 0:
            return self.linear(self.emit("split", (x,)))  # a Linear over half of the features: not channels
        return self.activation(x)

    def build(self) -> RandomNet:
        x = 0
        if self.motif == "shared":
            x = self.shared(x)
            if self.rng.random() < 0.5:  # the shared layer dense, its producers pruned
                self.dense_layers.append(self.shared_layers[-1])
        elif self.motif == "over width":
            x = self.over_width(self.activation(self.conv(x)))
        for _ in range(self.rng.randint(0, 2) if self.motif else self.rng.randint(3, 8)):
            example = self.examples[x]
            if example.ndim == 4 and self.rng.random() < 0.15:
                how = self.rng.choice(["torch.flatten", "view", "method", "mean"])
                how = "reshape" if how == "view" and not example.is_contiguous() else how
                x = self.emit("mean", (x,), False) if how == "mean" else self.emit("flatten", (x,), how)
            else:
                x = self.map_step(x) if example.ndim == 4 else self.vector_step(x)
        if self.examples[x].ndim == 4:
            x = self.emit("flatten", (self.layer(nn.AdaptiveAvgPool2d(1), x),), "method")
        elif self.examples[x].ndim == 3:
            x = self.emit("flatten", (x,), "torch.flatten", kind="flatten of a Linear's 3-D output")
        x = self.linear(x, 5)
        extra = self.rng.randrange(1, len(self.examples) - 1) if self.rng.random() < 0.15 else None
        self.net.outputs = (x,) if extra is None else (x, extra)
        return self.net


def randomized(model: nn.Module, rng: random.Random) -> None:
    """Biases and BatchNorm statistics as after training, so that pruned channels output non-zero constants."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g))
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.copy_(torch.randn(module.num_features, generator=g))
                module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=g))


def edit_channels(model: RandomNet, builder: Builder, rng: random.Random) -> None:
    """Training-free mask edits: twins (producers of one shared layer) prune the same channels, mostly with the
    same bias; some layers lose or regain a random channel, or become dense again."""
    layers, twins = model.layers, builder.twins
    with torch.no_grad():
        for name in builder.dense_layers:
            layers[name].weight_mask.fill_(True)
            layers[name].weight_orig.copy_(torch.randn_like(layers[name].weight_orig) * 0.3)
        for module in layers.values():
            if not hasattr(module, "weight_mask") or rng.random() > 0.5:
                continue
            rows = [rng.randrange(module.weight_mask.shape[0])]
            active = rng.random() < 0.3
            if rng.random() < 0.25:  # the whole layer active again
                rows, active = ~module.weight_mask.flatten(1).any(1), True
            module.weight_mask[rows] = active
            module.weight_orig[rows] = torch.randn_like(module.weight_orig[rows]) * 0.3 * active
        for a, b in twins:
            first, second = layers[a], layers[b]
            if hasattr(first, "weight_mask") and hasattr(second, "weight_mask") and rng.random() < 0.7:
                rows = ~first.weight_mask.flatten(1).any(1)
                second.weight_mask[rows] = False
                second.weight_orig[rows] = 0
                if first.bias is not None and second.bias is not None:
                    second.bias.copy_(first.bias)
        sparse = [m for m in layers.values() if hasattr(m, "weight_mask")]
        if not any((~m.weight_mask.flatten(1).any(1)).any() for m in sparse):  # keep a pruned channel somewhere
            module = rng.choice(sparse)
            module.weight_mask[0] = False
            module.weight_orig[0] = 0


def run_case(seed: int) -> tuple[str, set[str]]:
    """Build, prune and export case `seed`; returns `("shrunk" | "refused" | "kept", the step kinds)`, where the
    kinds also say whether a shared layer was shrunk, a Linear over the width or an in-place write was refused;
    "kept": no channel could be removed (a `DSTError` that lists why each layer keeps its pruned channels)."""
    builder = Builder(seed)
    model = builder.build()
    rng = builder.rng
    randomized(model, rng)
    sparse_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    dst_prune.apply(model, sparsity=rng.uniform(0.3, 0.7), granularity="channel",
                    dense_stem_and_head=sparse_layers > 2 and rng.random() < 0.5, seed=seed)
    edit_channels(model, builder, rng)
    model.eval()
    x = torch.randn(3, *builder.examples[0].shape[1:])
    with torch.no_grad():
        expected = model(x)
    before = snapshot(model)
    kinds = set(builder.kinds)
    try:
        exported = dst_prune.export(model, format="shrink")
    except dst_prune.DSTError as error:
        assert_unchanged(model, before)
        names = [n for n, m in model.named_modules() if n and not list(m.children())]  # layers.l0, layers.l1, ...
        assert any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", str(error)) for n in names), str(error)
        if any(f"layers.{n} (Linear): a Linear reads the last dimension" in str(error) for n in builder.width_layers):
            kinds.add("Linear over width refused")
        if "writes in place into" in str(error):
            kinds.add("in-place write refused")
        return ("refused" if "cannot remove" in str(error) else "kept"), kinds
    assert_unchanged(model, before)
    if any(exported.layers[n].weight.shape[1] < model.layers[n].weight.shape[1] for n in builder.shared_layers):
        kinds.add("shared layer shrunk")
    with torch.no_grad():
        torch.testing.assert_close(exported(x), expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"case {seed}: {m}")
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in model.parameters()), seed
    return "shrunk", kinds


@pytest.fixture
def one_thread():
    """Tiny layers of ever new shapes: one thread is several times faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_random_graphs_shrink_exactly_or_refuse_by_name(one_thread):
    outcomes, shrunk_kinds, refused_kinds = Counter(), Counter(), Counter()
    for seed in range(CASES):
        outcome, kinds = run_case(seed)
        outcomes[outcome] += 1
        (shrunk_kinds if outcome == "shrunk" else refused_kinds).update(kinds)
    # the generator reaches every kind of step in cases that really shrink, and refusals are not the rule
    assert outcomes["shrunk"] >= CASES // 4 and outcomes["refused"] >= CASES // 10, outcomes
    expected = {"Conv2d", "Linear", "BatchNorm2d", "BatchNorm1d", "activation", "MaxPool2d", "padded avgpool",
                "AdaptiveAvgPool2d", "flatten", "mean", "residual add", "channel cat", "feature cat", "shared layer",
                "permute", "transpose", "scalar", "gate", "unsqueeze", "mean keepdim", "shared layer shrunk"}
    assert expected <= set(shrunk_kinds), expected - set(shrunk_kinds)
    assert refused_kinds["Linear over width refused"] >= 2, refused_kinds
    assert refused_kinds["in-place write refused"] >= 1, refused_kinds

