"""The method registry behind `apply(method=...)`: built-in and outside methods register the same way.

    @dst_prune.register_method("my_rigl")
    class MyRigL(dst_prune.DropAndGrow):
        ...

`apply(method="my_rigl", ...)` then builds it with its hyperparameters (its dataclass fields), and
`apply(method=MyRigL(drop_fraction=0.2))` takes an instance directly.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import DSTError
from .base import SparseAlgorithm

__all__ = ["create_algorithm", "list_methods", "method_class", "register_method"]

_METHODS: dict[str, type[SparseAlgorithm]] = {}


def register_method(name: str, *, replace: bool = False) -> Callable[[type[SparseAlgorithm]], type[SparseAlgorithm]]:
    """Class decorator: make a `SparseAlgorithm` subclass available as `apply(method=name)`.

    Args:
        name: the `method=` name (also the class's `name` and what checkpoints record).
        replace: allow taking over a name already registered.

    Raises:
        DSTError: the name is taken (without `replace`), empty, or the class is not a `SparseAlgorithm`.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise DSTError(f"register_method needs a method name that is a Python identifier; received {name!r}.")

    def register(cls: type[SparseAlgorithm]) -> type[SparseAlgorithm]:
        if not (isinstance(cls, type) and issubclass(cls, SparseAlgorithm)):
            raise DSTError(f"register_method({name!r}) decorates a subclass of dst_prune.SparseAlgorithm; received "
                           f"{cls!r}.")
        if name in _METHODS and _METHODS[name] is not cls and not replace:
            raise DSTError(f"method name {name!r} is already registered (by {_METHODS[name].__qualname__}); pick "
                           f"another name or pass replace=True.")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return register


def list_methods() -> list[str]:
    """The names accepted by `method=`, in registration order."""
    return list(_METHODS)


def method_class(name: str) -> type[SparseAlgorithm]:
    """The class registered as `name`.

    Raises:
        DSTError: no method has that name (the message lists the valid ones).
    """
    if name not in _METHODS:
        raise DSTError(f"method={name!r} is unknown; valid choices: {', '.join(list_methods())}.")
    return _METHODS[name]


def create_algorithm(method: object, hyperparameters: dict) -> SparseAlgorithm:
    """The algorithm for `method`: a registered name, a `SparseAlgorithm` subclass or a fresh instance."""
    if isinstance(method, SparseAlgorithm):
        if hyperparameters:
            raise DSTError(f"method is an instance of {type(method).__name__}; give its hyperparameters "
                           f"({', '.join(sorted(hyperparameters))}) to its constructor, not to apply.")
        if method.context is not None:
            raise DSTError(f"method is an instance of {type(method).__name__} that already drives another model; "
                           f"create a new instance for each apply.")
        return method
    if isinstance(method, type) and issubclass(method, SparseAlgorithm):
        return method.create(**hyperparameters)
    if not isinstance(method, str):
        raise DSTError(f"method={method!r} is unknown; valid choices: {', '.join(list_methods())}.")
    return method_class(method).create(**hyperparameters)
