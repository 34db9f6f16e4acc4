"""`free_gradients=True`: each parameter is stepped inside backward and its gradient freed at once.

A `register_post_accumulate_grad_hook` on every parameter runs the optimizer's update for that parameter as
soon as its gradient is complete, then replaces `.grad` by a `SpentGradient`, a stand-in without memory. So at
most one layer's gradient is alive at a time (optimizer-in-backward), and the usual loop stays valid:
`loss.backward(); opt.step(); opt.zero_grad(); dst.step()` (`opt.step()` only finishes the bookkeeping).
Learning-rate schedulers keep working: the hooks read each group's `lr` when they run.

It cannot work where something needs the gradients between backward and step: gradient accumulation (a second
backward before `opt.step()`), clipping by the global norm, `torch.amp.GradScaler` (its `unscale_` reads them),
or DDP (the hook fires before the all-reduce averages the gradient). Each is a `DSTError` naming it:

- DDP, or any process group of more than one rank: at construction, or at the first backward if the group is
  created later, before any parameter is stepped.
- Anything that touches a freed gradient (clipping, `unscale_`, reading `.grad`, accumulating into it):
  `SpentGradient` raises on every use. The first backward after construction only gathers the gradients (the
  active ones of sparse parameters) and `opt.step()` applies them, so a conflicting loop is refused at its first
  iteration before any weight or state changed. From then on, parameters are stepped inside backward.
- A second backward before `opt.step()` (also after `zero_grad()`): at its first gradient, before any step.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

from ..errors import DSTError

__all__ = ["GradientFreeing", "SpentGradient"]

_CONFLICTS = ("free_gradients=True steps each parameter inside backward and frees its gradient at once, so "
              "nothing can use the gradients between backward and optimizer.step(): no gradient accumulation (a "
              "second backward before step), no clipping by the global norm (clip_grad_norm_, a trainer's "
              "max_grad_norm or gradient_clip_val; also the norm a trainer logs, as transformers' Trainer does at "
              "every step), no torch.amp.GradScaler, no reading of .grad. Use "
              "free_gradients=False for such a loop (the optimizer state stays compact).")


def _world_size() -> int:
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


def refuse_distributed(optimizer_name: str) -> None:
    """A `DSTError` in a process group of several ranks (DDP would average the gradients after the hook)."""
    if _world_size() > 1:
        raise DSTError(f"{optimizer_name}(free_gradients=True) cannot run with DDP (a process group of "
                       f"{_world_size()} ranks): it would step each parameter with its local gradient before "
                       f"DDP's all-reduce averages it across ranks. Use free_gradients=False under DDP.")


class SpentGradient(torch.Tensor):
    """The `.grad` of a parameter whose gradient was applied and freed: any use of it is a `DSTError`."""

    parameter_name: str

    @staticmethod
    def __new__(cls, param: torch.Tensor, name: str) -> SpentGradient:
        spent = torch.Tensor._make_wrapper_subclass(cls, param.shape, strides=param.stride(), dtype=param.dtype,
                                                    device=param.device)
        spent.parameter_name = name
        return spent

    @classmethod
    def _refuse(cls, func: object, args: tuple) -> DSTError:
        names = [a.parameter_name for a in args if isinstance(a, SpentGradient)]
        names += [a.parameter_name for a in (args[0] if args and isinstance(args[0], (list, tuple)) else ())
                  if isinstance(a, SpentGradient)]
        what = names[0] if names else "a parameter"
        return DSTError(f"the gradient of {what} was already applied and freed (an operation {_name(func)} tried to "
                        f"use it). {_CONFLICTS}")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.__str__):
            return f"SpentGradient({args[0].parameter_name!r})"
        raise cls._refuse(func, args)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise cls._refuse(func, args)


def _name(func: object) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # a property such as .device
        name = f".{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    return repr(name)


class _StepHook:
    """Post-accumulate-grad hook: hands the parameter to its optimizer (held weakly)."""

    def __init__(self, freeing: GradientFreeing) -> None:
        self.freeing = weakref.ref(freeing)

    def __call__(self, param: torch.Tensor) -> None:
        freeing = self.freeing()
        if freeing is not None:
            freeing.gradient_ready(param)


class GradientFreeing:
    """The in-backward stepping of one `CompactStateOptimizer` (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = weakref.ref(optimizer)
        self.name = type(optimizer).__name__
        refuse_distributed(self.name)
        self.handles: dict[torch.Tensor, object] = {}
        self.spent: list[torch.Tensor] = []
        self.pending: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.verified = False  # the first step went through without a conflict
        self.in_backward = False
        self.awaiting_step = False  # a backward ended since the last step
        self.groups: dict[torch.Tensor, dict] = {}

    def watch(self, params: Iterable[torch.Tensor]) -> None:
        for param in params:
            if param.requires_grad and param not in self.handles:
                self.handles[param] = param.register_post_accumulate_grad_hook(_StepHook(self))

    # --- inside backward -------------------------------------------------------------------------------
    def gradient_ready(self, param: torch.Tensor) -> None:
        optimizer = self.optimizer()
        if optimizer is None or param.grad is None:
            return
        if not self.in_backward:
            self._backward_begins(optimizer, param)
        group = self.groups.get(param)
        if group is None:
            return
        grad = param.grad
        if self.verified:
            optimizer.step_parameters(group, [param], [grad])
        else:
            self.pending[param] = optimizer.gather_gradient(param, grad)
        param.grad = SpentGradient(param, optimizer.name_of(param))
        self.spent.append(param)

    def _backward_begins(self, optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
        """Checks at the first gradient of a backward, before anything is stepped."""
        if self.awaiting_step:
            param.grad = None  # as it was: the previous backward's gradients were freed
            done = ("the previous backward's updates are applied already (call optimizer.step() to finish that "
                    "step); nothing of this backward was. " if self.verified else "")
            raise DSTError(f"a second backward reached {optimizer.name_of(param)} before optimizer.step(): "
                           f"gradient accumulation; {done}{_CONFLICTS}")
        try:
            refuse_distributed(self.name)
        except DSTError:
            param.grad = None
            raise
        self.groups = {p: group for group in optimizer.param_groups for p in group["params"]}
        self.in_backward = True
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)

    def _backward_ends(self) -> None:
        self.in_backward = False
        self.awaiting_step = True

    # --- at optimizer.step() / zero_grad() -------------------------------------------------------------------
    def finish_step(self) -> None:
        """Apply what the first backward gathered (once), then drop the stand-ins of the freed gradients."""
        optimizer = self.optimizer()
        pending, self.pending = self.pending, {}
        for group in optimizer.param_groups if optimizer is not None else ():
            params = [p for p in group["params"] if p in pending]
            optimizer.step_parameters(group, params, [pending[p][0] for p in params], [pending[p][1] for p in params])
            # parameters without a hook (frozen at construction, unfrozen since) are stepped here, as usual
            unwatched = [p for p in group["params"] if p not in pending and p.grad is not None
                         and not isinstance(p.grad, SpentGradient)]
            optimizer.step_parameters(group, unwatched, [p.grad for p in unwatched])
        if self.awaiting_step:
            self.verified = True
        self._drop_spent()
        self.in_backward = self.awaiting_step = False

    def forget_gradients(self) -> None:
        """`zero_grad()`: the freed gradients' stand-ins and any gathered, not yet applied gradient go.

        Before the first step nothing was applied, so a new backward may follow; after it, the backward's updates
        are applied already, and only `optimizer.step()` ends that step.
        """
        self.pending.clear()
        self._drop_spent()
        self.in_backward = False
        if not self.verified:
            self.awaiting_step = False

    def _drop_spent(self) -> None:
        for param in self.spent:
            if isinstance(param.grad, SpentGradient):
                param.grad = None
        self.spent.clear()
