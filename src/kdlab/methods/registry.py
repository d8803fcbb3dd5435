"""Registry of distillation methods by name.

Every module of :mod:`kdlab.methods` is imported the first time a method is looked up, so each
method module registers itself; user methods register the same way from a plugin module.
"""

from __future__ import annotations

from typing import TypeVar

from kdlab.core.errors import MethodError
from kdlab.core.registries import METHODS
from kdlab.methods.base import Distiller

__all__ = ["get_method", "list_methods", "register_method"]

D = TypeVar("D", bound=type[Distiller])


def register_method(cls: D) -> D:
    """Class decorator registering a :class:`Distiller` subclass under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise MethodError(f"method class {cls.__qualname__} needs a class attribute "
                          "`name = \"...\"` to be registered")
    METHODS.register(name, cls)
    return cls


def get_method(name: str) -> type[Distiller]:
    """The distiller class registered as ``name``."""
    return METHODS.get(name)


def list_methods(kind: str | None = None) -> list[str]:
    """Registered method names, optionally only those of one kind ("logit" or "partner")."""
    return [n for n, c in METHODS.items() if kind is None or c.kind == kind]
