"""The public extension point: a method written outside the package registers, trains at the exact budget and
checkpoints like a built-in one; the documented example runs; the package has no import circle."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dst_prune
from dst_prune.algorithms import registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_registry(monkeypatch):
    """Registrations made by a test go into a copy of the registry, so other tests see the built-in methods only."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


def define_momentum_growth():
    @dst_prune.register_method("momentum_growth")
    class MomentumGrowth(dst_prune.DropAndGrow):
        """Grow where the optimizer's momentum buffer of the dense gradient is largest (an outside method)."""

        def __init__(self, drop_fraction: float | None = None, boost: float = 1.0) -> None:
            super().__init__(drop_fraction=drop_fraction)
            self.boost = boost

        def needs_dense_gradient(self, step: int) -> bool:
            return self.is_update_step(step)

        def prepare(self) -> None:
            self.gradients = self.dense_gradients()

        def grow_scores(self, layer: int) -> torch.Tensor:
            return self.targets[layer].scores(self.gradients[layer] * self.boost)

    return MomentumGrowth


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))


def train(model: nn.Module, dst, optimizer, steps: int, check=None) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        loss = nn.functional.cross_entropy(model(x), x[:, :4].argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        before = [t.mask.clone() for t in dst.targets]
        dst.step()
        if check is not None:
            check(before)


def test_an_outside_method_registers_trains_exactly_and_checkpoints(own_registry):
    cls = define_momentum_growth()
    assert "momentum_growth" in dst_prune.list_methods()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = dst_prune.apply(model, sparsity=0.8, method="momentum_growth", optimizer=optimizer, update_every=4,
                          dense_stem_and_head=False, boost=2.0, drop_fraction=0.25)
    assert isinstance(dst.algorithm, cls) and dst.algorithm.boost == 2.0
    counts = [t.active() for t in dst.targets]
    changed = []

    def check(before):
        assert [t.active() for t in dst.targets] == counts  # the exact budget, layer by layer
        for target, old in zip(dst.targets, before):
            assert not target.orig.detach()[~target.mask].any()  # zero outside the mask
            grown = target.mask & ~old
            changed.append(int(grown.sum()))
            assert not target.orig.detach()[grown].any()  # new weights start at zero

    train(model, dst, optimizer, 20, check)
    assert dst.update_index == 5 and sum(changed) > 0

    fresh = mlp()
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    again = dst_prune.apply(fresh, sparsity=0.8, method="momentum_growth", optimizer=fresh_optimizer,
                            update_every=4, dense_stem_and_head=False, boost=2.0, drop_fraction=0.25)
    again.load_state_dict(dst.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(dst.targets, again.targets))
    assert again.update_index == dst.update_index


def test_an_instance_or_a_class_is_a_method_too(own_registry):
    cls = define_momentum_growth()
    for method, extra in ((cls(drop_fraction=0.5, boost=3.0), {}), (cls, {"boost": 3.0, "drop_fraction": 0.5})):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        dst = dst_prune.apply(model, sparsity=0.8, method=method, optimizer=optimizer, update_every=4,
                              dense_stem_and_head=False, **extra)
        assert dst.algorithm.boost == 3.0 and dst.algorithm.drop_fraction == 0.5
        budget = dst.budget
        train(model, dst, optimizer, 8)
        assert sum(t.active() for t in dst.targets) == budget and dst.update_index == 2
    instance = cls()
    dst_prune.apply(mlp(), sparsity=0.8, method=instance, dense_stem_and_head=False)
    with pytest.raises(dst_prune.DSTError, match="already drives another model"):
        dst_prune.apply(mlp(), sparsity=0.8, method=instance, dense_stem_and_head=False)
    with pytest.raises(dst_prune.DSTError, match="give its hyperparameters"):
        dst_prune.apply(mlp(), sparsity=0.8, method=cls(), boost=2.0, dense_stem_and_head=False)


def test_registration_mistakes_are_clear_errors(own_registry):
    define_momentum_growth()
    with pytest.raises(dst_prune.DSTError, match="'momentum_growth' is already registered"):
        define_momentum_growth()
    with pytest.raises(dst_prune.DSTError, match="Python identifier"):
        dst_prune.register_method("my method")
    with pytest.raises(dst_prune.DSTError, match=r"decorates a subclass of dst_prune\.SparseAlgorithm"):
        dst_prune.register_method("not_a_method")(dict)


def test_the_documented_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "own_method.py")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    updates, regrown = map(int, re.search(r"(\d+) updates, (\d+) weights regrown", result.stdout).groups())
    assert updates > 0 and regrown > 0


def _imports_of(path: Path, package: str) -> set[str]:
    """The package modules `path` imports (relative or absolute), inside functions too: a deferred import only
    hides a circle."""
    module = package + "." + ".".join(path.relative_to(ROOT / package).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[:len(base) - node.level + 1])
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update([target, *names])
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == package or name.startswith(package + ".")}


def test_the_package_has_no_import_circle():
    package = "dst_prune"
    files = {}
    for path in (ROOT / package).rglob("*.py"):
        name = package + "." + ".".join(path.relative_to(ROOT / package).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path
    graph = {name: {m for m in _imports_of(path, package) if m in files and m != name} for name, path in files.items()}
    for name in graph:  # a package's __init__ importing its own modules is how packages work: not a circle
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}

    def circle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    circles = [c for c in map(circle_from, graph) if c]
    assert not circles, f"import circles: {circles[:3]}"


def test_import_dst_prune_loads_torch_numpy_and_prettytable_only():
    probe = ("import sys; import torch; before = {m.split('.')[0] for m in sys.modules}; import dst_prune; "
             "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - before)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    added = set(result.stdout.split()) - set(sys.stdlib_module_names) - {"_decimal"}
    assert added <= {"dst_prune", "numpy", "prettytable", "wcwidth"}, f"import dst_prune also loads {added}"


def test_a_gradient_method_is_one_attribute_and_its_dense_gradients_are_freed(own_registry):
    import dataclasses

    @dst_prune.register_method("abs_gradient")
    @dataclasses.dataclass(eq=False, kw_only=True)
    class AbsGradient(dst_prune.DropAndGrow):
        grows_by = "gradient"
        drop_fraction: float = 0.25

    assert AbsGradient.defaults() == {"drop_fraction": 0.25, "decay": "constant"}
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = dst_prune.apply(model, sparsity=0.8, method="abs_gradient", optimizer=optimizer, update_every=4,
                          dense_stem_and_head=False)
    seen = []
    real = dst.algorithm.exchange

    def exchange(fraction):  # during the update the gradients are there, one per sparse tensor
        seen.append([tuple(g.shape) for g in dst.algorithm.gradients])
        grown_before = [t.mask.clone() for t in dst.targets]
        real(fraction)
        for target, gradient, before in zip(dst.targets, captured, grown_before):
            grown = target.mask & ~before
            if grown.any():  # grown where |dL/dW| was largest among the candidates
                assert gradient.abs()[grown].min() >= gradient.abs()[~target.mask & ~before].max() - 1e-12

    captured = []

    def capture(fraction):
        captured[:] = [g.clone() for g in dst.algorithm.gradients]
        exchange(fraction)

    dst.algorithm.exchange = capture
    train(model, dst, optimizer, 8)
    assert dst.update_index == 2 and seen == [[tuple(t.shape) for t in dst.targets]] * 2
    assert dst.algorithm.gradients is None  # freed after the update
    assert all(s.value is None for s in dst.dense_gradient_sinks)  # and nothing captured while not needed


def test_decay_and_distribution_take_callables_and_refuse_bad_ones():
    model = mlp()
    dst = dst_prune.apply(model, sparsity=0.8, method="rigl", total_steps=40, update_every=4,
                          dense_stem_and_head=False, decay=lambda progress: (1 - progress) ** 2,
                          distribution=lambda shape: 1.0 / shape[1])
    assert dst.budget == round(0.2 * dst.n_sparse)
    densities = [t.active() / t.numel for t in dst.targets]
    assert densities[0] > densities[1]  # 16 inputs: denser than 48 inputs
    dst.context.step = 20
    assert dst.algorithm.current_drop_fraction() == pytest.approx(0.3 * (1 - 20 / 30) ** 2)  # stop at 0.75 * 40
    for bad, message in ((lambda p: 2.0, "returned 2.0"), (lambda p: "x", "returned 'x'")):
        with pytest.raises(dst_prune.DSTError, match=message):
            dst_prune.apply(mlp(), sparsity=0.8, method="rigl", total_steps=40, decay=bad)
    with pytest.raises(dst_prune.DSTError, match="must return a positive, finite density weight"):
        dst_prune.apply(mlp(), sparsity=0.8, distribution=lambda shape: 0.0)


def test_a_method_declaring_defaults_the_old_way_still_gets_them_with_a_warning(own_registry):
    @dst_prune.register_method("old_style")
    class OldStyle(dst_prune.DropAndGrow):
        default_decay = "cosine"

    with pytest.warns(DeprecationWarning, match="default_decay is deprecated"):
        algorithm = OldStyle()
    assert algorithm.decay == "cosine"
