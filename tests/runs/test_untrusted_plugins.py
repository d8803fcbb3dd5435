"""A data file never chooses code to run (docs/reliability.md, "Plugins named by data files").

A run's ``config.yaml`` and an exported ``student.pt`` name the plugins their model needs; the
readers (``kdlab eval RUN``, ``kdlab export RUN``, ``kdlab.load_student``, ``read_student``) do
not import them: a named plugin the user did not trust (``--plugin``, ``plugins=[...]``,
``KDLAB_PLUGINS``) is refused in one line, and the plugin's import (which writes a marker
file) never happens. The end-to-end tests read in fresh processes, so that the plugin is not
already imported; the others craft the data files by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.cli.main import main
from kdlab.core.errors import CheckpointError, PluginError
from kdlab.core.plugins import (
    PLUGINS_ENV,
    check_trusted,
    env_plugins,
    same_plugin,
    trusted_plugins,
    untrusted_plugins,
)
from kdlab.deploy.export import read_student, save_student
from kdlab.models import create_model
from kdlab.runs.open import open_run

SRC = Path(__file__).resolve().parents[2] / "src"
SPEC = "plugins/marker_plug.py"  # as the run records it: relative to the training folder
#: the plugin: registers a model and leaves a marker each time it is imported
PLUGIN = """\
from pathlib import Path

from kdlab.models.cifar.resnet import resnet8
from kdlab.models.registry import register_model

with open(Path(__file__).resolve().parent.parent / "imported.marker", "a") as f:
    f.write("imported\\n")
register_model("marker_net")(resnet8)
"""
CONFIG: dict[str, Any] = {
    "name": "untrusted",
    "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 8,
             "synthetic": {"n_train": 16, "n_test": 8, "num_classes": 4, "size": 16}},
    "student": {"arch": "marker_net"},
    "optim": {"epochs": 1, "milestones": []},
    "runtime": {"threads": 1, "amp": "off"},
}


def refusal(owner: str, spec: str, file: str | None = "config.yaml") -> str:
    where = f" in {file}" if file else ""
    return (f"{owner} names plugin {spec!r}{where}; kdlab does not import code named by a data "
            f"file: pass --plugin {spec} (or plugins={[spec]!r} in Python, or "
            f"KDLAB_PLUGINS={spec}) to trust it")


def python(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh interpreter in ``cwd`` (no KDLAB_PLUGINS unless given)."""
    environ = {k: v for k, v in os.environ.items() if k != PLUGINS_ENV}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), environ.get("PYTHONPATH")]))
    environ.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=300)


def kdlab_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return python(["-m", "kdlab", *args], cwd, **env)


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``plugins/marker_plug.py``, ``run`` (trained with the plugin's model
    through ``kdlab.run(..., plugins=[SPEC])``) and ``student.pt`` (exported from it); no
    marker left."""
    root = tmp_path_factory.mktemp("untrusted")
    (root / "plugins").mkdir()
    (root / SPEC).write_text(PLUGIN)
    script = textwrap.dedent(f"""\
        import kdlab
        from kdlab.deploy.export import export_run
        kdlab.run({CONFIG!r}, run_dir="run", plugins=[{SPEC!r}])
        export_run("run", "state_dict", "student.pt", plugins=[{SPEC!r}])
        """)
    done = python(["-c", script], root)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((root / "run" / "config.yaml").read_text())["plugins"] == [SPEC]
    (root / "imported.marker").unlink()
    return root


def marker(root: Path) -> Path:
    return root / "imported.marker"


# --------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_kdlab_eval_refuses_the_run_plugin_and_trusts_the_flag(plugin_run: Path) -> None:
    marker(plugin_run).unlink(missing_ok=True)
    done = kdlab_cli(["eval", "run"], plugin_run)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"kdlab: error: {refusal('run run', SPEC)}"]
    assert not marker(plugin_run).exists()
    # trusted with the flag, spelled relative to another folder than the recorded one
    done = kdlab_cli(["eval", "../run", "--plugin", "marker_plug.py"], plugin_run / "plugins")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("marker_net ") and "top-1" in done.stdout
    assert marker(plugin_run).read_text() == "imported\n"


@pytest.mark.e2e
def test_kdlab_export_refuses_the_run_plugin_and_trusts_the_environment(
        plugin_run: Path) -> None:
    marker(plugin_run).unlink(missing_ok=True)
    args = ["export", "run", "--format", "state_dict", "--out", "again.pt"]
    done = kdlab_cli(args, plugin_run)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"kdlab: error: {refusal('run run', SPEC)}"]
    assert not marker(plugin_run).exists() and not (plugin_run / "again.pt").exists()
    done = kdlab_cli(args, plugin_run, KDLAB_PLUGINS=str((plugin_run / SPEC).resolve()))
    assert done.returncode == 0, done.stderr
    assert (plugin_run / "again.pt").is_file() and marker(plugin_run).exists()


@pytest.mark.e2e
def test_load_student_and_read_student_refuse_then_load_when_trusted(plugin_run: Path) -> None:
    marker(plugin_run).unlink(missing_ok=True)
    script = textwrap.dedent(f"""\
        import json, os, sys
        from pathlib import Path
        import kdlab
        from kdlab.core.errors import PluginError
        from kdlab.deploy.export import read_student
        out = {{}}
        for name, read in [("load_student", lambda: kdlab.load_student("run")),
                           ("read_student", lambda: read_student("student.pt"))]:
            try:
                read()
                out[name] = "loaded"
            except PluginError as e:
                out[name] = str(e)
        out["marker"] = Path("imported.marker").exists()
        out["imported"] = sorted(m for m in sys.modules if "marker_plug" in m)
        os.environ["KDLAB_PLUGINS"] = {SPEC!r}
        out["read_env"] = read_student("student.pt").num_classes
        del os.environ["KDLAB_PLUGINS"]
        out["load_flag"] = type(kdlab.load_student("run", plugins=[{SPEC!r}])).__name__
        out["read_flag"] = read_student("student.pt", plugins=["marker_plug"]).num_classes
        print(json.dumps(out))
        """)
    done = python(["-c", script], plugin_run)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["load_student"] == refusal("run run", SPEC)
    assert out["read_student"] == refusal("student file student.pt", SPEC, None)
    assert out["marker"] is False and out["imported"] == []
    assert out["read_env"] == 4 and out["read_flag"] == 4 and out["load_flag"] == "ResNet"
    assert marker(plugin_run).read_text() == "imported\n"  # once, whatever the spelling


# --------------------------------------------------------------------------- crafted files
@pytest.fixture
def evil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder, holding ``evil_mod.py`` (it would leave ``pwned`` if imported) and
    ``run/config.yaml`` naming it and a second plugin with a newline in its name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    (tmp_path / "evil_mod.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('pwned').write_text('x')\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(
        {"student": {"arch": "resnet8"}, "plugins": ["evil_mod", "two\nlines"]}))
    return tmp_path


def test_open_run_imports_nothing_the_config_names(evil: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PluginError) as err:
        open_run("run")
    msg = str(err.value)
    assert msg.startswith("run run names plugins 'evil_mod', 'two\\nlines' in config.yaml; "
                          "kdlab does not import code named by a data file: pass --plugin "
                          "evil_mod --plugin 'two\\nlines' (or plugins=")
    assert msg.endswith(" to trust them") and "\n" not in msg
    assert main(["eval", "run"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"kdlab: error: {msg}"]
    # a trusted name is no longer listed; the other still is
    with pytest.raises(PluginError, match=r"^run run names plugin 'two\\nlines' in config"):
        open_run("run", plugins=["evil_mod.py"])
    assert not (evil / "pwned").exists() and "evil_mod" not in sys.modules


def test_student_file_naming_a_plugin_is_refused(evil: Path) -> None:
    meta = {"arch": "resnet8", "num_classes": 2, "in_channels": 3, "plugins": ["evil_mod"]}
    save_student(create_model("resnet8", num_classes=2), evil / "student.pt", meta)
    with pytest.raises(PluginError) as err:
        read_student(evil / "student.pt")
    assert str(err.value) == refusal(f"student file {evil / 'student.pt'}", "evil_mod", None)
    assert not (evil / "pwned").exists() and "evil_mod" not in sys.modules
    save_student(create_model("resnet8", num_classes=2), evil / "bad.pt",
                 {**meta, "plugins": "evil_mod"})
    with pytest.raises(CheckpointError, match="'plugins' must be a list of plugin specs"):
        read_student(evil / "bad.pt")
    del meta["plugins"]  # a file that names none reads as before
    save_student(create_model("resnet8", num_classes=2), evil / "plain.pt", meta)
    assert read_student(evil / "plain.pt").num_classes == 2


# --------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(("a", "b", "same"), [
    ("my_kd", "my_kd", True),
    ("my_kd", "pkg.my_kd", False),              # dotted names compare as strings
    ("plug/my_kd.py", "./plug/../plug/my_kd.py", True),
    ("plug/my_kd.py", "/elsewhere/my_kd.py", True),  # the recorded folder is unknown
    ("plug/my_kd.py", "plug/other.py", False),
    ("my_kd", "plug/my_kd.py", True),           # one module, two spellings
    ("my_kd.py", "my_kd", True),
    ("pkg.my_kd", "pkg/my_kd.py", False),
])
def test_same_plugin(a: str, b: str, same: bool) -> None:
    assert same_plugin(a, b) is same and same_plugin(b, a) is same


def test_environment_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGINS_ENV, f" a, b{os.pathsep}c/d.py,,")
    assert env_plugins() == ["a", "b", "c/d.py"]
    assert trusted_plugins(["x", "a"]) == ["x", "a", "b", "c/d.py"]
    assert untrusted_plugins(["a", "d", "z", "z"], trusted_plugins()) == ["z"]
    check_trusted(["d.py"], trusted_plugins(), "run r")  # trusted: no error
    monkeypatch.delenv(PLUGINS_ENV)
    assert env_plugins() == [] and trusted_plugins(["x"]) == ["x"]
