"""Every command, option and config key that ``kdlab doctor`` suggests exists.

All string constants of :mod:`kdlab.cli.doctor` (messages, f-string parts, docstrings) are
scanned for ``kdlab COMMAND``, ``--option`` and dotted config keys (``data.download``); each is
checked against the real parser (:func:`kdlab.cli.main.build_parser`) and the config schema
(:class:`kdlab.config.schema.ExperimentConfig`). The dataset warning, the one check whose message
suggests what to do, is also triggered and checked the same way.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from typing import Any

from kdlab.cli import doctor
from kdlab.cli.main import build_parser
from kdlab.config import ExperimentConfig, model_in_annotation

COMMAND = re.compile(r"\bkdlab ([a-z]+)((?: [a-z]+)?)([^`\n]*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
CONFIG_KEY = re.compile(r"\b((?:" + "|".join(ExperimentConfig.model_fields) + r")\.[a-z_.]*[a-z_])")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}




def _config_key_exists(key: str) -> bool:
    model: Any = ExperimentConfig
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = model_in_annotation(fields[part].annotation)
    return True


def doctor_strings() -> list[str]:
    """Every string constant in kdlab/doctor.py (f-strings contribute their literal parts)."""
    tree = ast.parse(inspect.getsource(doctor))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def problems(texts: list[str]) -> list[str]:
    """What in ``texts`` names a command, option or config key that does not exist."""
    parser = build_parser()
    commands = _subparsers(parser)
    every_option = _options(parser).union(*(_options(p) for p in commands.values()))
    for p in commands.values():
        every_option |= set().union(*(_options(s) for s in _subparsers(p).values()))
    bad = []
    for text in texts:
        for cmd, action, rest in COMMAND.findall(text):
            if cmd not in commands:
                bad.append(f"command `kdlab {cmd}` in {text!r}")
                continue
            target = commands[cmd]
            sub = _subparsers(target)
            if sub and action.strip() not in sub:
                bad.append(f"`kdlab {cmd}{action}` in {text!r}")
                continue
            if sub:
                target = sub[action.strip()]
            for opt in OPTION.findall(rest):
                if opt not in _options(target):
                    bad.append(f"option {opt} of `kdlab {cmd}` in {text!r}")
        for opt in OPTION.findall(text):
            if opt not in every_option:
                bad.append(f"option {opt} in {text!r}")
        for key in CONFIG_KEY.findall(text):
            if not _config_key_exists(key):
                bad.append(f"config key {key} in {text!r}")
    return bad


def test_the_scanner_finds_wrong_suggestions() -> None:
    assert problems(["use --downlaod", "`kdlab fetch`", "kdlab doctor --cfg x",
                     "--set data.downlaod=true", "kdlab config shwo"]) == [
        "option --downlaod in 'use --downlaod'",
        "command `kdlab fetch` in '`kdlab fetch`'",
        "option --cfg of `kdlab doctor` in 'kdlab doctor --cfg x'",
        "option --cfg in 'kdlab doctor --cfg x'",
        "config key data.downlaod in '--set data.downlaod=true'",
        "`kdlab config shwo` in 'kdlab config shwo'",
    ]
    assert problems(["kdlab doctor --run-dir D --json", "--set data.download=true",
                     "kdlab config show", "data.synthetic.n_train", "runtime.log_every"]) == []


def test_every_suggestion_in_doctor_exists() -> None:
    assert problems(doctor_strings()) == []


def test_the_dataset_warning_suggests_what_exists() -> None:
    check = doctor.check_datasets([{"name": "fashion_mnist", "path": None}])
    assert check.status == "warn"
    assert "data.download" in check.detail
    assert problems([check.detail]) == []


def test_config_key_lookup_follows_nesting() -> None:
    assert _config_key_exists("teacher.checkpoint")
    assert _config_key_exists("method.partners")
    assert not _config_key_exists("optim.nope")
