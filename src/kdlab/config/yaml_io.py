"""Reading and writing config files: YAML with ``_base_`` inheritance, dotted overrides.

A config file may start with ``_base_: relative/path.yaml`` (or a list of paths): the bases are
loaded first and the file's own keys are deep-merged over them, so each experiment file holds
only what differs from its protocol. Command-line overrides use dotted keys
(``optim.lr=0.1``, ``method.params.beta=6``); their values are parsed as YAML scalars/lists.
Duplicate keys are errors naming both lines. Validation is :mod:`kdlab.config.schema`'s.

Plugins: a config the user passes (:func:`load_config`, :func:`validate_config_with_plugins`) is
the user's own input, so the plugins it names are imported. A config read back from a run
(:func:`validate_stored_config`) is data: the plugins it names are never imported, only those
the user trusts (``--plugin``, ``KDLAB_PLUGINS``), and a named plugin the user did not trust is
a one-line :class:`~kdlab.core.errors.PluginError`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kdlab.config.schema import ExperimentConfig, validate_config
from kdlab.core.errors import ConfigError
from kdlab.core.plugins import check_trusted, import_plugins, trusted_plugins

__all__ = ["ConfigLoader", "DuplicateKeyError", "apply_overrides", "config_plugins", "dump_yaml",
           "load_config", "load_yaml_text", "parse_override", "read_yaml", "read_yaml_file",
           "validate_config_with_plugins", "validate_stored_config"]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping holds the same key twice (raised by :class:`ConfigLoader`)."""

    def __init__(self, key: Any, line: int, first_line: int, mark: yaml.Mark) -> None:
        super().__init__(None, None, f"duplicate key {key!r} (first at line {first_line})", mark)
        self.key, self.line, self.first_line = key, line, first_line


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping holding the same key twice is an error.

    The plain ``SafeLoader`` silently keeps the last of two equal keys, so a config that sets
    ``lr`` twice would train with whichever came last. Here :class:`DuplicateKeyError` names the
    key and both lines, at any nesting level. Keys brought in by a merge key (``<<: *anchor``)
    may still be overridden by the mapping's own keys, as YAML intends. Every YAML file kdlab
    reads as config (experiment configs and their ``_base_`` files, sweep specs, ``--set``
    values) goes through this loader (:func:`load_yaml_text`, :func:`read_yaml_file`).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    seen_at = first.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it below
                    continue
                line = key_node.start_mark.line + 1
                if seen_at is not None:
                    raise DuplicateKeyError(key, line, seen_at, key_node.start_mark)
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    """One YAML document parsed with :class:`ConfigLoader` (raises ``yaml.YAMLError``)."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """The line (1-based, if known) and a one-line description of a YAML error."""
    if isinstance(e, yaml.MarkedYAMLError):
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        problem = " ".join((e.problem or "syntax error").split())
        if e.context:
            where = f" at line {e.context_mark.line + 1}" if e.context_mark is not None else ""
            context = " ".join(e.context.split()) + where
            # "expected a single document ..., but found another document" reads in that order
            problem = (f"{context}, {problem}" if problem.startswith("but ")
                       else f"{problem} ({context})")
        return line, problem
    if isinstance(e, yaml.reader.ReaderError):
        line = text[: e.position].count("\n") + 1 if isinstance(e.position, int) else None
        char = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or " ")
        return line, f"unacceptable character #x{char:04x}: {e.reason}"
    return None, " ".join(str(e).split())


def load_yaml_text(text: str, source: str) -> Any:
    """Parse one YAML document with :class:`ConfigLoader`.

    Raises:
        ConfigError: one line starting with ``source`` (e.g. ``config file F``): ``F line 12:
            duplicate key 'lr' (first at line 9)`` or ``F line 3 is not valid YAML: ...``.
    """
    try:
        return _parse_yaml(text)
    except DuplicateKeyError as e:
        raise ConfigError(f"{source} line {e.line}: {e.problem}") from e
    except yaml.YAMLError as e:
        line, problem = _yaml_problem(e, text)
        where = f" line {line}" if line is not None else ""
        raise ConfigError(f"{source}{where} is not valid YAML: {problem}") from e


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML document in ``path`` (None for an empty file), read with :class:`ConfigLoader`.

    Raises:
        ConfigError: one line naming ``what`` and the file: missing, a directory, unreadable,
            not UTF-8, not valid YAML, or a mapping with a duplicate key.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give the path of a YAML file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path} line {line} is not UTF-8 text (byte "
                          f"0x{raw[e.start]:02x}); save the file as UTF-8") from e
    return load_yaml_text(text, f"{what} {path}")


def _kind(value: Any) -> str:
    """``value``'s YAML kind in words (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _found(value: Any) -> str:
    """``value``'s kind and a shortened repr, e.g. ``a number (3)``."""
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return _kind(value) if value is None else f"{_kind(value)} ({shown})"


def _base_files(path: Path, bases: Any) -> list[Path]:
    """The files named by config file ``path``'s ``_base_`` (a path or a list of paths,
    relative to ``path``'s folder), each checked to be an existing file."""
    rule = "_base_ must be a path or a list of paths (strings)"
    items = [bases] if isinstance(bases, str) else bases
    if not isinstance(items, list):
        raise ConfigError(f"config file {path}: {rule}, found {_found(bases)}")
    for i, b in enumerate(items):
        if not isinstance(b, str) or not b.strip():
            what = "an empty string" if isinstance(b, str) else _found(b)
            at = f" as item {i} of the list" if isinstance(bases, list) else ""
            raise ConfigError(f"config file {path}: {rule}, found {what}{at}")
    files = []
    for b in items:
        target = (path.parent / b).resolve()
        if not target.exists():
            raise ConfigError(f"config file {path}: _base_ {b!r} not found (looked for {target})")
        if target.is_dir():
            raise ConfigError(f"config file {path}: _base_ {b!r} is a directory ({target}); "
                              "give the path of a YAML file")
        files.append(target)
    return files


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, resolving ``_base_`` inheritance (paths relative to the file).

    The file is parsed by :func:`read_yaml_file` (duplicate keys are errors); an empty file is
    an empty mapping. ``_base_`` must be a path or a list of paths.
    """
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config inheritance loops: {chain}")
    data = read_yaml_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys (key: value "
                          f"lines), found {_kind(data)}")
    merged: dict[str, Any] = {}
    for base in _base_files(path, data.pop("_base_", [])):
        merged = _deep_merge(merged, read_yaml(base, (*_seen, path)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _parse_yaml(raw) if raw.strip() else None
    except DuplicateKeyError as e:
        raise ConfigError(f"override {text!r}: duplicate key {e.key!r} in the value") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML "
                          f"({_yaml_problem(e, raw)[1]})") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``data`` with each dotted ``key=value`` override set (creating mappings as needed)."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {p!r} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                plugins: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config (with ``_base_`` inheritance), apply dotted overrides, import the
    plugins (the config's ``plugins``, then ``plugins``, then ``$KDLAB_PLUGINS``), validate.

    For a config the user gives (train, distill, config show/check, sweeps); a run's stored
    config goes through :func:`validate_stored_config` instead."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate_config_with_plugins(data, str(path) if path is not None else "command line",
                                        plugins)


def config_plugins(data: dict[str, Any], source: str = "config") -> list[str]:
    """The plugin specs config mapping ``data`` names under ``plugins`` (a string or a list of
    strings; absent or null: none). Imports nothing.

    Raises:
        ConfigError: ``plugins`` holds something else.
    """
    raw = data.get("plugins")
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise ConfigError(f"{source}: config key 'plugins' must be a list of module names or "
                          f".py paths (got {_found(raw)})")
    return list(raw)


def validate_config_with_plugins(data: dict[str, Any], source: str = "config",
                                 plugins: list[str] | None = None) -> ExperimentConfig:
    """Validate a config the user gives: merge ``data["plugins"]`` with ``plugins`` and
    ``$KDLAB_PLUGINS`` (order kept, duplicates dropped), store the merged list in ``data``,
    import those modules (:mod:`kdlab.core.plugins`), then validate.

    Never use it on a config read from a data file (a run's ``config.yaml``): that would import
    the code the file names; use :func:`validate_stored_config`."""
    merged = list(dict.fromkeys([*config_plugins(data, source),
                                 *trusted_plugins(plugins or [])]))
    data = {**data, "plugins": merged}
    import_plugins(merged)
    return validate_config(data, source)


def validate_stored_config(data: dict[str, Any], source: str, plugins: Sequence[str] = (), *,
                           owner: str, file: str) -> ExperimentConfig:
    """Validate a config read from a data file (a run's ``config.yaml``, overrides applied)
    without letting it choose code to run.

    Only the trusted plugins (``plugins``, then ``$KDLAB_PLUGINS``) are imported, and they
    become the config's ``plugins``; the specs ``data`` names are compared with them
    (:func:`~kdlab.core.plugins.same_plugin`) and never imported. ``owner`` and ``file`` word
    the refusal (``run runs/x``, ``config.yaml``).

    Raises:
        PluginError: one line, when ``data`` names a plugin the user did not trust (nothing is
            imported then), or a trusted plugin cannot be imported.
        ConfigError: the config is not valid.
    """
    trusted = trusted_plugins(plugins)
    check_trusted(config_plugins(data, source), trusted, owner, file)
    import_plugins(trusted)
    return validate_config({**data, "plugins": trusted}, source)


def dump_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML text (keys in schema order)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
