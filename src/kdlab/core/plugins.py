"""User plugins: modules imported before a config is validated, so that they can register
methods, models and datasets (``kdlab train cfg.yaml --plugin my_kd`` or ``plugins: [my_kd]``).

A plugin spec is either a dotted module name, importable from ``sys.path`` with the current
working directory put first for the import (as ``python -m`` does), or a path to a ``.py`` file,
relative to the current working directory. Each module is imported once per process: naming it
again (even by its other spelling, ``my_kd`` and ``my_kd.py``) does not run it again. See
``docs/extending.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

from kdlab.core.errors import KdlabError, PluginError
from kdlab.core.registry import rollback_on_error

__all__ = ["import_plugin", "import_plugins"]


def import_plugins(specs: Iterable[str]) -> list[str]:
    """Import every plugin spec in order; return the imported modules' names (one per spec).

    Raises :class:`PluginError` (one line: ``plugin 'x' could not be imported: <reason>``).
    """
    return [import_plugin(spec) for spec in specs]


def import_plugin(spec: str) -> str:
    """Import one plugin (a dotted module name or a ``.py`` path) once; return its module name."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"plugin {spec!r} could not be imported: give a module name "
                          "(my_kd, pkg.my_kd) or a .py file path")
    text = spec.strip()
    if text.endswith(".py") or "/" in text or os.sep in text:
        return _import_file(spec, Path(text).expanduser())
    return _import_module(spec, text)


# --------------------------------------------------------------------------- dotted names
def _import_module(spec: str, name: str) -> str:
    if not all(part.isidentifier() for part in name.split(".")):
        raise PluginError(f"plugin {spec!r} could not be imported: not a dotted module name "
                          "(my_kd, pkg.my_kd) nor a path to a .py file")
    if name in sys.modules:
        return name
    with _first_on_sys_path(os.getcwd()), rollback_on_error():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(f"{e.name}.")):
                raise PluginError(f"plugin {spec!r} could not be imported: no module named "
                                  f"{e.name!r} in the current directory or on sys.path"
                                  ) from e
            raise PluginError(f"plugin {spec!r} could not be imported: {_reason(e)}") from e
        except Exception as e:
            raise PluginError(f"plugin {spec!r} could not be imported: {_reason(e)}") from e
    return name


# --------------------------------------------------------------------------- .py files
def _import_file(spec: str, path: Path) -> str:
    path = (Path.cwd() / path).resolve()
    if path.suffix != ".py":
        raise PluginError(f"plugin {spec!r} could not be imported: {path} is not a .py file")
    if not path.is_file():
        raise PluginError(f"plugin {spec!r} could not be imported: file not found: {path}")
    loaded = _module_of_file(path)
    if loaded is not None:
        return loaded
    with _first_on_sys_path(os.getcwd(), str(path.parent)), rollback_on_error():
        name = _module_name_for(path)
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise PluginError(f"plugin {spec!r} could not be imported: {path} is not loadable")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise PluginError(f"plugin {spec!r} could not be imported: {_reason(e)}") from e
    return name


def _module_of_file(path: Path) -> str | None:
    """The name of an imported module loaded from ``path``, if any."""
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and os.path.basename(file) == path.name and _same_file(file, path):
            return name
    return None


def _same_file(file: str, path: Path) -> bool:
    try:
        return Path(file).resolve() == path
    except OSError:
        return False


def _module_name_for(path: Path) -> str:
    """The file's stem when ``import <stem>`` would find this very file (so that ``my_kd`` and
    ``my_kd.py`` are one module, and pickled objects of the plugin can be found again), else a
    private name that cannot shadow another module."""
    stem = path.stem
    if stem.isidentifier() and stem not in sys.modules:
        try:
            found = importlib.util.find_spec(stem)
        except (ImportError, ValueError):
            found = None
        if found is None or (found.origin and _same_file(found.origin, path)):
            return stem
    safe = re.sub(r"\W", "_", stem)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"kdlab_plugin_{safe}_{digest}"


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _first_on_sys_path(*dirs: str) -> Iterator[None]:
    """Put ``dirs`` at the front of ``sys.path`` for the block (those not already on it)."""
    added = [d for d in dict.fromkeys(dirs) if d not in sys.path]
    sys.path[:0] = added
    importlib.invalidate_caches()  # files written since the last import are found
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def _reason(e: BaseException) -> str:
    """``Type: message (file:line)`` of an exception, on one line."""
    if isinstance(e, KdlabError):
        text = str(e)
    elif isinstance(e, SyntaxError):
        text = f"SyntaxError: {e.msg}"
    else:
        message = str(e).strip().splitlines()
        text = f"{type(e).__name__}: {message[0]}" if message else type(e).__name__
    where = _where(e)
    return f"{text} ({where})" if where else text


def _where(e: BaseException) -> str | None:
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "importlib" not in f.filename and not f.filename.startswith("<frozen")]
    # the plugin's own line: the deepest frame outside kdlab (kdlab raised on its behalf)
    outside = [f for f in frames if not _inside(f.filename, _KDLAB_DIR)]
    last = (outside or frames or [None])[-1]
    return f"{last.filename}:{last.lineno}" if last is not None else None


_KDLAB_DIR = Path(__file__).resolve().parents[1]


def _inside(file: str, folder: Path) -> bool:
    try:
        return Path(file).resolve().is_relative_to(folder)
    except (OSError, ValueError):
        return False
