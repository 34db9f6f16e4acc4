"""Shared pieces of the benchmarks: models, the sparse variants (ours and the peers'), timing, tables.

Every variant builds the same model from the same seed and exposes `step()`, one training step (forward,
backward, optimizer step, and the method's own bookkeeping). Peers are optional: a peer that is not
installed (`pip install -e ".[bench]"`) is reported as missing, not silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prettytable import PrettyTable
from torch import nn

import dst_prune
from dst_prune.targets import find_targets

MODELS = {  # the default configurations: name -> (batch, image size)
    "resnet18": (32, 64),
    "resnet50": (16, 112),
    "vit_small_patch16_224": (8, 224),
    "lenet_300_100": (100, 28),  # MNIST-sized MLP: where a fixed per-step cost shows
}
MORE_MODELS = {  # by name only, not by default: vit_base for GPUs, timm's tiny test models for quick CPU runs
    "vit_tiny_patch16_224": (8, 224), "vit_base_patch16_224": (8, 224), "test_resnet": (2, 32), "test_vit": (2, 32),
}
CHANNELS = {"lenet_300_100": 1}  # input channels (3 otherwise)
SPARSITY = 0.9
MEMORY_FORMAT = {"value": torch.contiguous_format}  # the scripts' --channels-last sets torch.channels_last


def build_model(name: str, size: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if name == "lenet_300_100":
        from dst_prune.compat.models.lenet import lenet_300_100

        return lenet_300_100(in_features=size * size, num_classes=100).to(device)
    import timm  # here: the scripts that need no model start faster (reallocation, memory's parent)

    kwargs = {"img_size": size} if "vit" in name else {}
    return timm.create_model(name, num_classes=100, **kwargs).to(device, memory_format=MEMORY_FORMAT["value"])


def clock(model: nn.Module) -> float:
    """`time.perf_counter()` once the model's device has finished its queued work (CUDA runs asynchronously)."""
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class Variant:
    name: str
    model: nn.Module
    step: Callable[[], None]
    update: Callable[[], None] | None = None  # one topology update, for the amortized cost
    notes: list[str] = field(default_factory=list)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _loop(model, optimizer, batch, autocast, after=None, before_step=None) -> Callable[[], None]:
    x, y = batch

    def step() -> None:
        with autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is None or before_step():
            optimizer.step()
        if after is not None:
            after()
    return step


def dense(name, size, device, batch, autocast) -> Variant:
    model = build_model(name, size, device)
    return Variant("dense", model, _loop(model, _sgd(model), batch, autocast))


def ours(method: str, name, size, device, batch, autocast) -> Variant:
    model = build_model(name, size, device)
    optimizer = _sgd(model)
    dst = dst_prune.apply(model, sparsity=SPARSITY, method=method, optimizer=optimizer, update_every=10**9,
                          total_steps=10**10, init="random")

    def update() -> None:
        dst.capture_dense_gradients()
        with autocast():
            nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        start = clock(model)
        dst.reparameterize()
        update.seconds = clock(model) - start
    return Variant(f"dst_prune {method}", model, _loop(model, optimizer, batch, autocast, after=dst.step), update)


def torch_prune(name, size, device, batch, autocast) -> Variant:
    from torch.nn.utils import prune

    model = build_model(name, size, device)
    for spec in find_targets(model):
        prune.random_unstructured(model.get_submodule(spec.module_name), spec.tensor_name, amount=SPARSITY)
    return Variant("torch.nn.utils.prune", model, _loop(model, _sgd(model), batch, autocast))


def rigl_torch(name, size, device, batch, autocast) -> Variant:
    from rigl_torch.RigL import RigLScheduler

    model = build_model(name, size, device)
    optimizer = _sgd(model)
    # Its default `ignore_linear_layers=True` would leave a ViT dense but for the patch embedding.
    pruner = RigLScheduler(model, optimizer, dense_allocation=1 - SPARSITY, T_end=10**9, delta=10**8,
                           ignore_linear_layers=False)

    def update() -> None:
        saved, pruner.step = pruner.step, pruner.delta_T - 1  # its hooks capture dense gradients now
        with autocast():
            nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        start = clock(model)
        pruner._rigl_step()
        update.seconds = clock(model) - start
        pruner.step = saved
    return Variant("rigl-torch", model, _loop(model, optimizer, batch, autocast, before_step=pruner), update)


def sparsimony(method: str, name, size, device, batch, autocast) -> Variant:
    from sparsimony.distributions.base import UniformDistribution
    from sparsimony.dst.rigl import RigL
    from sparsimony.dst.set import SET
    from sparsimony.schedulers.base import ConstantScheduler

    model = build_model(name, size, device)
    optimizer = _sgd(model)
    cls = {"rigl": RigL, "set": SET}[method]
    sparsifier = cls(scheduler=ConstantScheduler(0.3, t_end=10**9, delta_t=10**8),
                     distribution=UniformDistribution(), optimizer=optimizer, sparsity=SPARSITY)
    sparsifier.prepare(model, [{"tensor_fqn": s.name} for s in find_targets(model)])

    def update() -> None:
        with autocast():
            nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        sparsifier._step_count = 10**8 - 1  # the next step is an update step
        start = clock(model)
        sparsifier.step()
        update.seconds = clock(model) - start
    return Variant(f"sparsimony {method}", model, _loop(model, optimizer, batch, autocast, after=sparsifier.step),
                   update)


def variants(names: list[str]) -> list[tuple[str, Callable[..., Variant]]]:
    """`(label, factory)` for the variant names given (`dense`, `dsr`, `prune`, `rigl-torch`, ...)."""
    table = {"dense": dense, "prune": torch_prune, "rigl-torch": rigl_torch,
             "sparsimony-rigl": lambda *a: sparsimony("rigl", *a), "sparsimony-set": lambda *a: sparsimony("set", *a)}
    for method in dst_prune.list_methods():
        table[method] = lambda *a, m=method: ours(m, *a)
    return [(n, table[n]) for n in names]


class Timer:
    """Wall-clock seconds of `fn()`, synchronizing CUDA when the model is there."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        start_time = time.perf_counter()
        fn()
        return time.perf_counter() - start_time


def summary(samples: list[float]) -> dict:
    return {"median_ms": 1000 * statistics.median(samples), "min_ms": 1000 * min(samples),
            "max_ms": 1000 * max(samples), "repeats": len(samples)}


@contextlib.contextmanager
def competing_load(processes: int) -> Iterator[None]:
    """Run the block with `processes` busy-loop processes competing for the cores (a loaded machine: a serving
    host, a shared workstation); they are stopped when the block ends."""
    workers = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for _ in range(processes)]
    try:
        time.sleep(0.2 if processes else 0)  # (let them start)
        yield
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def load_average() -> float | None:
    """The 1-minute load average (what else ran on the machine), None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def rotated(names: list[str], round_: int) -> list[str]:
    """`names` starting at `round_ % len(names)`: every entry runs in every position equally often."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def commit() -> str | None:
    """The checkout's commit (short hash, `+dirty` with uncommitted changes), or None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` as JSON, with the commit it was measured at (unless it names one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "commit": payload.get("commit", commit())}, indent=1))


def machine(threads: int | None = None) -> str:
    """The device (the CPU's model and cores, or the GPU), the threads and the torch version."""
    import platform

    threads = torch.get_num_threads() if threads is None else threads
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, {threads} threads (torch {torch.__version__})"


def table(columns: list[str], rows: list[list]) -> PrettyTable:
    result = PrettyTable(field_names=columns, align="r")
    result.align[columns[0]] = "l"
    result.add_rows(rows)
    return result


def interleaved(fns: dict[str, Callable[..., object]], x: object, repeats: int, warmup: int = 2,
                timer: Timer | None = None) -> dict[str, list[float]]:
    """Seconds per call `fn(x)` of each `fns` entry, in `repeats` rounds that call every entry once, in an order
    that rotates every round (so that drift in the machine's load hits every entry alike). `timer`: how a call
    is timed (a `Timer` of the device; default: the CPU's clock)."""
    names = list(fns)
    timer = timer or Timer(torch.device("cpu"))
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn(x)
        samples: dict[str, list[float]] = {n: [] for n in names}
        for round_ in range(repeats):
            for name in rotated(names, round_):
                samples[name].append(timer(lambda name=name: fns[name](x)))
    return samples


def write_markdown(path: Path, title: str, columns: list[str], rows: list[list]) -> None:
    lines = [f"{title}\n", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
