"""``docs/config-reference.md`` is generated from the config schema and is up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from kdlab.cli.main import main
from kdlab.config import ExperimentConfig
from kdlab.config.reference import NOTES, config_keys, config_reference

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
REGENERATE = "kdlab config reference > docs/config-reference.md"


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted key of ``model`` (items of a list of sections as ``key[].sub``)."""
    keys = set()
    for name, info in model.model_fields.items():
        keys.add(prefix + name)
        item = "[]" if get_origin(info.annotation) is list else ""
        for sub in _models(info.annotation):
            keys |= _schema_keys(sub, f"{prefix}{name}{item}.")
    return keys


def test_committed_reference_is_up_to_date() -> None:
    assert REFERENCE.is_file(), f"docs/config-reference.md is missing: run `{REGENERATE}`"
    assert REFERENCE.read_text() == config_reference(), (
        f"docs/config-reference.md is out of date with the config schema: run `{REGENERATE}`")


def test_cli_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == config_reference()


def test_every_key_is_listed_and_described() -> None:
    keys = {k.key: k for k in config_keys()}
    expected = _schema_keys(ExperimentConfig)
    assert set(keys) == expected
    for nested in ("data.synthetic.n_train", "teacher.checkpoint", "method.partners[].name",
                   "optim.lr", "runtime.log_every"):
        assert nested in keys
    undocumented = [k for k, row in keys.items() if not row.description]
    assert not undocumented, f"config keys without a description: {undocumented}"
    stale = sorted(set(NOTES) - set(keys))
    assert not stale, f"NOTES in kdlab/config_reference.py name keys the schema lacks: {stale}"


def test_types_defaults_and_allowed_values() -> None:
    keys = {k.key: k for k in config_keys()}
    amp = keys["runtime.amp"]
    assert (amp.type, amp.default) == ("str", "`auto`")
    assert amp.allowed == "`auto`, `bf16`, `fp16`, `off`"
    assert keys["data.train_fraction"].allowed.startswith("> 0.0, <= 1.0")
    assert keys["student.arch"].default == "required"
    assert keys["teacher"].type == "mapping or null"
    assert keys["optim.clip_grad_norm"].type == "float or `auto` or null"
    assert "`fashion_mnist`" in keys["data.name"].allowed
    assert "`sd_dkd`" in keys["method.name"].allowed
    assert "`sd_dkd`" not in keys["method.partners[].name"].allowed
