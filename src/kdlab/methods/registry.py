"""Registry of distillation methods by name."""

from __future__ import annotations

from typing import TypeVar

from kdlab.errors import MethodError
from kdlab.methods.base import Distiller

_METHODS: dict[str, type[Distiller]] = {}

D = TypeVar("D", bound=type[Distiller])


def register_method(cls: D) -> D:
    """Class decorator registering a :class:`Distiller` subclass under ``cls.name``."""
    if cls.name in _METHODS:
        raise MethodError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Distiller]:
    """The distiller class registered as ``name``."""
    _ensure_loaded()
    if name not in _METHODS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _METHODS[name]


def list_methods(kind: str | None = None) -> list[str]:
    """Registered method names, optionally only those of one kind ("logit" or "partner")."""
    _ensure_loaded()
    return sorted(n for n, c in _METHODS.items() if kind is None or c.kind == kind)


def _ensure_loaded() -> None:
    # Importing the package imports every method module, which runs their decorators.
    import kdlab.methods  # noqa: F401
