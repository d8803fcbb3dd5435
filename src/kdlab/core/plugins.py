"""User plugins: modules imported before a config is validated, so that they can register
methods, models and datasets (``kdlab train cfg.yaml --plugin my_kd`` or ``plugins: [my_kd]``).

A plugin spec is either a dotted module name, importable from ``sys.path`` with the current
working directory put first for the import (as ``python -m`` does), or a path to a ``.py`` file,
relative to the current working directory. Each module is imported once per process: naming it
again (even by its other spelling, ``my_kd`` and ``my_kd.py``) does not run it again. See
``docs/extending.md``.

**Trust.** Plugins are code, so they come only from the user: ``--plugin``, the config a user
passes to ``train``/``distill``, or the environment variable ``KDLAB_PLUGINS``
(:func:`trusted_plugins`). A data file (a run's ``config.yaml``, a ``student.pt``) may *name*
plugins, but a reader never imports what it names: :func:`check_trusted` refuses, in one line,
when a named plugin is not among the trusted ones (:func:`same_plugin` compares the specs).

**Isolation.** A plugin's import runs with ``sys.argv`` reduced to the program name (a plugin
that parses arguments at import sees none of kdlab's) and with ``sys.stderr`` held back; a
``SystemExit`` raised by the import (``sys.exit``, argparse giving up) becomes a one-line
:class:`PluginError` and the held-back output (argparse's usage text) is dropped, so a plugin can
neither end kdlab silently nor speak as kdlab. Output of an import that ends otherwise is passed
on.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import io
import logging
import os
import re
import shlex
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

from kdlab.core.errors import KdlabError, PluginError
from kdlab.core.registry import rollback_on_error

__all__ = ["PLUGINS_ENV", "check_trusted", "env_plugins", "import_plugin", "import_plugins",
           "same_plugin", "trusted_plugins", "untrusted_plugins"]

log = logging.getLogger(__name__)

#: the environment variable of trusted plugin specs, comma- or ``os.pathsep``-separated; every
#: command and every reader imports them as if given by ``--plugin``.
PLUGINS_ENV = "KDLAB_PLUGINS"


def import_plugins(specs: Iterable[str]) -> list[str]:
    """Import every plugin spec in order; return the imported modules' names (one per spec).

    Raises :class:`PluginError` (one line: ``plugin 'x' could not be imported: <reason>``),
    also when a plugin raises ``SystemExit`` at import (``sys.exit``, argparse giving up).
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


# --------------------------------------------------------------------------- trust
def env_plugins() -> list[str]:
    """The plugin specs in ``$KDLAB_PLUGINS`` (split on ``,`` and ``os.pathsep``; blanks
    dropped); none when it is unset."""
    raw = os.environ.get(PLUGINS_ENV, "")
    return [part.strip() for part in re.split(f"[,{re.escape(os.pathsep)}]", raw)
            if part.strip()]


def trusted_plugins(given: Iterable[str] = ()) -> list[str]:
    """The plugins the user trusts: ``given`` (``--plugin``, ``plugins=``) followed by
    :func:`env_plugins`, in order, duplicates dropped."""
    return list(dict.fromkeys([*given, *env_plugins()]))


def same_plugin(a: str, b: str) -> bool:
    """Whether specs ``a`` and ``b`` name one plugin.

    Dotted names compare as strings. Two ``.py`` paths match when they resolve (against the
    current folder) to the same file, or have the same file name: a recorded relative path was
    relative to the folder the run was made in, which no run records. A dotted name and a
    ``.py`` path match when the name is the file's stem (kdlab imports them as one module).
    Matching only decides whether a reader refuses; the spec imported is always the trusted one.
    """
    a, b = a.strip(), b.strip()
    if a == b:
        return True
    a_path, b_path = _is_path(a), _is_path(b)
    if a_path and b_path:
        resolved = _resolved(a)
        return Path(a).name == Path(b).name or (resolved is not None and resolved == _resolved(b))
    if a_path == b_path:  # two different dotted names
        return False
    name, path = (b, Path(a)) if a_path else (a, Path(b))
    return path.suffix == ".py" and path.stem == name


def untrusted_plugins(named: Iterable[str], trusted: Iterable[str]) -> list[str]:
    """The specs of ``named`` (once each, in order) that no spec of ``trusted`` stands for
    (:func:`same_plugin`)."""
    trusted = list(trusted)
    return [spec for spec in dict.fromkeys(named)
            if not any(same_plugin(spec, t) for t in trusted)]


def check_trusted(named: Iterable[str], trusted: Iterable[str], owner: str,
                  file: str | None = None) -> None:
    """Refuse a data file that names plugins the user did not trust; import nothing.

    ``owner`` says whose file it is (``run runs/x``, ``student file F``) and ``file`` which
    file of it names them (``config.yaml``). Raises :class:`PluginError`, one line: ``run
    runs/x names plugin 'my_kd' in config.yaml; kdlab does not import code named by a data
    file: pass --plugin my_kd (or plugins=['my_kd'] in Python, or KDLAB_PLUGINS=my_kd) to
    trust it``.
    """
    missing = untrusted_plugins(named, trusted)
    if not missing:
        return
    many = len(missing) > 1
    names = ", ".join(repr(spec) for spec in missing)
    flags = " ".join(f"--plugin {_shell(spec)}" for spec in missing)
    env = _shell(",".join(missing))
    where = f" in {file}" if file else ""
    raise PluginError(f"{owner} names plugin{'s' if many else ''} {names}{where}; kdlab does "
                      f"not import code named by a data file: pass {flags} (or plugins="
                      f"{missing!r} in Python, or {PLUGINS_ENV}={env}) to trust "
                      f"{'them' if many else 'it'}")


def _is_path(text: str) -> bool:
    """Whether a plugin spec is a ``.py`` path (else a dotted module name)."""
    return text.endswith(".py") or "/" in text or os.sep in text


def _resolved(text: str) -> Path | None:
    try:
        return (Path.cwd() / Path(text).expanduser()).resolve()
    except (OSError, RuntimeError):
        return None


def _shell(text: str) -> str:
    """``text`` quoted for a shell command line, or its ``repr`` when it cannot be printed."""
    return shlex.quote(text) if text.isprintable() else repr(text)


# --------------------------------------------------------------------------- dotted names
def _import_module(spec: str, name: str) -> str:
    if not all(part.isidentifier() for part in name.split(".")):
        raise PluginError(f"plugin {spec!r} could not be imported: not a dotted module name "
                          "(my_kd, pkg.my_kd) nor a path to a .py file")
    if name in sys.modules:
        return name
    with _first_on_sys_path(os.getcwd()), rollback_on_error():
        try:
            with _isolated_import():
                importlib.import_module(name)
        except SystemExit as e:
            raise PluginError(_exit_message(spec, e)) from e
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
            with _isolated_import():
                module_spec.loader.exec_module(module)
        except SystemExit as e:
            sys.modules.pop(name, None)
            raise PluginError(_exit_message(spec, e)) from e
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


@contextlib.contextmanager
def _isolated_import() -> Iterator[None]:
    """Run a plugin's import with ``sys.argv`` set to just the program name and ``sys.stderr``
    held back. The held-back text is passed on afterwards, unless the import raised
    ``SystemExit`` (then it is argparse's usage text or a goodbye: logged at DEBUG only)."""
    argv = getattr(sys, "argv", None)
    if argv is not None:
        sys.argv = list(argv[:1])
    held = io.StringIO()
    exited = False
    try:
        with contextlib.redirect_stderr(held):
            yield
    except SystemExit:
        exited = True
        raise
    finally:
        if argv is not None:
            sys.argv = argv
        text = held.getvalue()
        if exited:
            log.debug("output of a plugin that exited at import (not shown): %r", text)
        elif text:
            sys.stderr.write(text)


def _exit_message(spec: str, e: SystemExit) -> str:
    """The one-line :class:`PluginError` message for a plugin whose import raised ``e``."""
    where = _where(e) or spec
    frames = traceback.extract_tb(e.__traceback__)
    if any(_same_path(f.filename, _ARGPARSE_FILE) for f in frames):
        return (f"plugin {spec!r} could not be imported: it parsed the command line at import "
                f"and argparse ended it (exit status {e.code!r} at {where}); a plugin must not "
                "parse arguments at import: move that under `if __name__ == \"__main__\":`")
    code = repr(e.code) if e.code is not None else ""
    if len(code) > 60:
        code = code[:57] + "..."
    return (f"plugin {spec!r} could not be imported: it tried to end kdlab at import "
            f"(sys.exit({code}) at {where}); a plugin may only define and register things")


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
              if "importlib" not in f.filename and not f.filename.startswith("<frozen")
              and not _same_path(f.filename, _ARGPARSE_FILE)]
    # the plugin's own line: the deepest frame outside kdlab (kdlab raised on its behalf)
    outside = [f for f in frames if not _inside(f.filename, _KDLAB_DIR)]
    last = (outside or frames or [None])[-1]
    return f"{last.filename}:{last.lineno}" if last is not None else None


_KDLAB_DIR = Path(__file__).resolve().parents[1]
_ARGPARSE_FILE = Path(argparse.__file__).resolve()


def _same_path(file: str, path: Path) -> bool:
    """Whether traceback file name ``file`` is the (resolved) ``path``."""
    return os.path.basename(file) == path.name and _same_file(file, path)


def _inside(file: str, folder: Path) -> bool:
    try:
        return Path(file).resolve().is_relative_to(folder)
    except (OSError, ValueError):
        return False
