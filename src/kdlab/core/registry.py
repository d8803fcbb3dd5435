"""A generic name -> object registry with "did you mean" errors and automatic discovery.

kdlab's methods, models and datasets each live in one :class:`Registry`. Entries register
themselves when their module is imported (``@register_method``, ``@register_model(name)``,
``@register_dataset(name)``); user code does the same from its own modules, loaded with
``--plugin`` or the config's ``plugins:`` key (:mod:`kdlab.core.plugins`).

Discovery: a registry built with ``packages=("kdlab.methods",)`` imports every submodule of
those packages (recursively) the first time it is asked for an entry or its names, so a new
module dropped into the package registers itself with no hand-maintained import list.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import pkgutil
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from kdlab.core.errors import KdlabError

__all__ = ["Registry", "check_keys_in_use", "rollback_on_error", "unknown_name_message"]

T = TypeVar("T")

#: at most this many "did you mean" suggestions.
MAX_SUGGESTIONS = 3
#: when a registry has no listing command, name at most this many entries in an error.
MAX_LISTED = 10


def unknown_name_message(kind: str, name: str, known: Iterable[str],
                         list_hint: str | None = None) -> str:
    """``unknown <kind> 'x'; did you mean a, b?`` plus where to find the full list (one line).

    Suggestions are the closest known names (case-insensitive, at most three). Without a close
    match the message points at ``list_hint`` (a command listing every name), or, when there is
    none, names up to ten entries.
    """
    known = sorted(set(known))
    by_lower: dict[str, list[str]] = {}
    for k in known:
        by_lower.setdefault(k.lower(), []).append(k)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=MAX_SUGGESTIONS)
    matches = [k for low in close for k in by_lower[low]][:MAX_SUGGESTIONS]
    head = f"unknown {kind} {name!r}"
    if matches:
        tail = f" ({list_hint} lists all)" if list_hint else ""
        return f"{head}; did you mean {', '.join(matches)}?{tail}"
    if list_hint:
        return f"{head}; run '{list_hint}' to list them"
    shown = known[:MAX_LISTED]
    more = ", ..." if len(known) > MAX_LISTED else ""
    return f"{head}; known {kind}s: {', '.join(shown)}{more}" if shown else f"{head}; none known"


def _describe(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(obj)


def _import_tree(package: str) -> None:
    """Import ``package`` and every module below it (subpackages recursively)."""
    pkg = importlib.import_module(package)
    path = getattr(pkg, "__path__", None)
    if path is None:  # a plain module: nothing below it
        return
    for info in pkgutil.iter_modules(path, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        if info.ispkg:
            _import_tree(info.name)
        else:
            importlib.import_module(info.name)


class Registry(Generic[T]):
    """Named objects of one ``kind`` ("method", "model", "dataset").

    Args:
        kind: the word used in messages (``unknown model 'x'``).
        error: the :class:`KdlabError` subclass raised for unknown or duplicate names.
        packages: packages whose modules register entries; all of their submodules are
            imported on the first :meth:`get`, :meth:`names` or ``in``.
        list_hint: the command that lists every entry (``"kdlab models"``), named in errors.
    """

    def __init__(self, kind: str, error: type[KdlabError], packages: tuple[str, ...] = (),
                 list_hint: str | None = None) -> None:
        self.kind = kind
        self.error = error
        self.packages = tuple(packages)
        self.list_hint = list_hint
        self._items: dict[str, T] = {}
        self._discovered = not self.packages
        self._discovering = False
        _ALL.add(self)

    # ------------------------------------------------------------------ registering
    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` under ``name`` and return it (an error if the name is taken).

        An entry from outside ``packages`` (a plugin) first runs discovery, so a clash with a
        built-in name is reported against the plugin, not against kdlab's module.
        """
        if not self._discovered and not self._discovering and not self._owns(obj):
            self.discover()
        old = self._items.get(name)
        if old is not None and old is not obj:
            raise self.error(f"{self.kind} {name!r} registered twice (already by "
                             f"{_describe(old)}); give {_describe(obj)} another name")
        self._items[name] = obj
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")``: register the decorated object under ``name``."""

        def deco(obj: T) -> T:
            return self.register(name, obj)

        return deco

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (tests, interactive reloading)."""
        if name not in self._items:
            raise self.error(unknown_name_message(self.kind, name, self._items, self.list_hint))
        return self._items.pop(name)

    # ------------------------------------------------------------------ looking up
    def get(self, name: str) -> T:
        """The entry registered as ``name``; unknown names raise ``error`` with suggestions."""
        self.discover()
        try:
            return self._items[name]
        except KeyError:
            raise self.error(
                unknown_name_message(self.kind, name, self._items, self.list_hint)) from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.discover()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs sorted by name."""
        self.discover()
        return sorted(self._items.items(), key=lambda kv: kv[0])

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._items

    # ------------------------------------------------------------------ discovery
    def _owns(self, obj: Any) -> bool:
        """Whether ``obj`` was defined in one of the discovered packages."""
        module = getattr(obj, "__module__", None) or ""
        return any(module == p or module.startswith(f"{p}.") for p in self.packages)

    def discover(self) -> None:
        """Import every module of ``packages`` once, so their entries are registered.

        Re-entrant: a module that asks this registry for its names while discovery imports it
        sees the entries registered so far instead of starting discovery again. A failed import
        propagates and the next call tries again.
        """
        if self._discovered or self._discovering:
            return
        self._discovering = True
        try:
            for package in self.packages:
                _import_tree(package)
            self._discovered = True
        finally:
            self._discovering = False

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._items)} entries)"


def check_keys_in_use(registry: Registry[Any], name: str, changed: set[str]) -> None:
    """Raise ``ValueError`` when ``changed`` holds a key that only other entries read.

    For registries of classes that declare the config keys they read in ``uses`` (optimizers,
    learning-rate schedules): a key set for another entry is a mistake, not silently ignored.
    """
    mine = getattr(registry.get(name), "uses", frozenset())
    others = set().union(*(getattr(obj, "uses", frozenset()) for _, obj in registry.items()))
    wrong = sorted(changed & (others - mine))
    if wrong:
        raise ValueError(f"{', '.join(wrong)} not used by {registry.kind} {name!r} (its keys: "
                         f"{', '.join(sorted(mine)) or 'none'})")


_ALL: weakref.WeakSet[Registry[Any]] = weakref.WeakSet()


@contextlib.contextmanager
def rollback_on_error() -> Iterator[None]:
    """Undo the registrations made inside the block if it raises.

    A plugin failing halfway through its import must not leave entries that collide when it is
    imported again. Built-in entries the block's discovery registered stay (their modules stay
    imported).
    """
    saved = {r: set(r._items) for r in list(_ALL)}
    try:
        yield
    except BaseException:
        for registry in list(_ALL):  # registries created in the block started empty
            before = saved.get(registry, set())
            for name in [n for n, obj in registry._items.items()
                         if n not in before and not registry._owns(obj)]:
                del registry._items[name]
        raise
