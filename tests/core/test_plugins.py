"""Plugins and registries: the docs/extending.md example run as written, plugin errors and
idempotence, the config's ``plugins:`` key, registry discovery and "did you mean" suggestions.

Doc convention (docs/extending.md): a fenced code block whose info string holds ``title=FILE``
(```` ```python title=my_kd.py ````) is written to ``FILE``; the block whose info string holds the
flag ``run`` (```` ```bash run ````) lists the commands, one ``kdlab ...`` per line, run in that
folder in order.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kdlab.cli.main import main
from kdlab.config import load_config
from kdlab.core.errors import (
    ConfigError,
    DatasetError,
    KdlabError,
    MethodError,
    ModelError,
    PluginError,
)
from kdlab.core.plugins import import_plugins
from kdlab.core.registry import Registry
from kdlab.data.registry import DATASETS, load_dataset
from kdlab.methods.registry import METHODS, get_method
from kdlab.models.registry import MODELS, create_model
from kdlab.sweep import plan_sweep

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
FENCE = re.compile(r"^```(?P<info>[^`\n]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)


def doc_blocks() -> tuple[dict[str, str], list[list[str]]]:
    """(files by title, commands) of the documented example."""
    files: dict[str, str] = {}
    commands: list[list[str]] = []
    for m in FENCE.finditer(DOC.read_text()):
        tokens = m["info"].split()
        attrs = dict(t.split("=", 1) for t in tokens[1:] if "=" in t)
        if "title" in attrs:
            files[attrs["title"]] = m["body"]
        if "run" in tokens[1:]:
            commands += [shlex.split(line) for line in m["body"].splitlines()
                         if line.strip() and not line.lstrip().startswith("#")]
    return files, commands


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty current directory; afterwards the plugin modules loaded from it are forgotten
    and the names they registered removed (registries are process-wide)."""
    monkeypatch.chdir(tmp_path)
    registries: list[Registry] = [METHODS, MODELS, DATASETS]
    before = [set(r.names()) for r in registries]
    yield tmp_path
    for registry, names in zip(registries, before, strict=True):
        for name in set(registry.names()) - names:
            registry.unregister(name)
    root = str(tmp_path.resolve())
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(root):
            del sys.modules[name]


def write_doc_files(folder: Path) -> list[list[str]]:
    files, commands = doc_blocks()
    assert {"my_kd.py", "teacher.yaml", "student.yaml"} <= set(files)
    for name, body in files.items():
        (folder / name).write_text(body)
    return commands


def run_dir_of(config: Path) -> Path:
    cfg = yaml.safe_load(config.read_text())
    return Path(cfg.get("output_dir", "runs")) / cfg["name"] / f"seed{cfg.get('seed', 0)}"


# --------------------------------------------------------------------------- the doc example
@pytest.mark.e2e
def test_extending_doc_example_runs_as_written(workdir: Path) -> None:
    commands = write_doc_files(workdir)
    assert [c[:2] for c in commands] == [["kdlab", "train"], ["kdlab", "distill"]]
    for argv in commands:
        assert main(argv[1:]) == 0, argv
    teacher = run_dir_of(workdir / "teacher.yaml")
    student = run_dir_of(workdir / "student.yaml")
    assert (teacher / "summary.json").is_file() and (student / "summary.json").is_file()
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    terms = [r["train_terms"] for r in records if "train_terms" in r]
    assert terms and all({"ce", "logit_mse"} <= set(t) for t in terms)
    saved = yaml.safe_load((student / "config.yaml").read_text())
    assert saved["plugins"] == ["my_kd"] and saved["method"]["name"] == "logit_mse"


def test_plugins_config_key_instead_of_flag(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    write_doc_files(workdir)
    cfg = yaml.safe_load((workdir / "student.yaml").read_text())
    (workdir / "keyed.yaml").write_text(yaml.safe_dump({**cfg, "plugins": ["my_kd.py"]}))
    # `config check` looks the method up: without the plugin it is unknown
    assert main(["config", "check", "student.yaml"]) == 1
    assert "unknown method 'logit_mse'" in capsys.readouterr().out
    assert main(["config", "check", "keyed.yaml"]) == 0
    assert "1 of 1 configs valid" in capsys.readouterr().out
    assert "logit_mse" in METHODS and "tiny_cnn" in MODELS
    # the flag adds to the key: merged in order, the same file named twice imported once
    loaded = load_config("keyed.yaml", plugins=["my_kd.py", "my_kd"])
    assert loaded.plugins == ["my_kd.py", "my_kd"]
    assert main(["config", "show", "keyed.yaml", "--plugin", "my_kd"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["plugins"] == ["my_kd.py", "my_kd"]


def test_plugin_dataset_is_known_to_config_validation(workdir: Path) -> None:
    (workdir / "dsplug.py").write_text(
        "from kdlab.data.registry import register_dataset, load_dataset\n\n\n"
        "@register_dataset('tiny_ds')\n"
        "def tiny(root, train, download, **options):\n"
        "    return load_dataset('synthetic', train=train, n_train=8, n_test=8)\n")
    (workdir / "cfg.yaml").write_text("student: {arch: resnet8}\ndata: {name: tiny_ds}\n")
    with pytest.raises(ConfigError, match=r"unknown dataset 'tiny_ds'"):
        load_config("cfg.yaml")
    cfg = load_config("cfg.yaml", plugins=["dsplug"])
    assert cfg.data.name == "tiny_ds" and cfg.plugins == ["dsplug"]
    assert len(load_dataset("tiny_ds", train=False)) == 8


@pytest.mark.e2e
def test_sweep_passes_plugins_to_every_worker(workdir: Path) -> None:
    write_doc_files(workdir)
    spec = workdir / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "sw", "output_dir": "out",
                                    "configs": ["teacher.yaml"], "seeds": [0]}))
    plan = plan_sweep(spec, plugins=["my_kd"])
    assert all(r.command[-2:] == ["--plugin", "my_kd"] for r in plan.runs)
    # a real worker process: it must import my_kd to build tiny_cnn
    assert main(["-q", "sweep", str(spec), "--plugin", "my_kd", "--no-progress"]) == 0
    assert (workdir / "out" / "sw" / "my_teacher" / "seed0" / "summary.json").is_file()


# --------------------------------------------------------------------------- plugin errors
def test_missing_plugin_is_one_line_error(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(PluginError) as err:
        import_plugins(["no_such_plugin_xyz"])
    msg = str(err.value)
    assert msg.startswith("plugin 'no_such_plugin_xyz' could not be imported: ")
    assert "no module named 'no_such_plugin_xyz'" in msg and "\n" not in msg
    (workdir / "cfg.yaml").write_text("student: {arch: resnet8}\n")
    assert main(["config", "show", "cfg.yaml", "--plugin", "no_such_plugin_xyz"]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"kdlab: error: {msg}"] and "Traceback" not in out.err
    with pytest.raises(PluginError, match=r"plugin 'gone\.py' could not be imported: file not "):
        import_plugins(["gone.py"])
    with pytest.raises(PluginError, match="not a dotted module name"):
        import_plugins(["my-plugin"])


def test_failing_plugin_names_the_line_and_undoes_its_registrations(workdir: Path) -> None:
    (workdir / "broken.py").write_text(
        "from kdlab.models.registry import register_model\n"
        "register_model('broken_net')(lambda num_classes, in_channels: None)\n"
        "1 / 0\n")
    for _ in range(2):  # failed twice the same way: no "registered twice" the second time
        with pytest.raises(PluginError) as err:
            import_plugins(["broken"])
        msg = str(err.value)
        assert msg.startswith("plugin 'broken' could not be imported: ZeroDivisionError")
        assert f"{workdir.resolve() / 'broken.py'}:3" in msg and "\n" not in msg
        assert "broken_net" not in MODELS and "broken" not in sys.modules
    (workdir / "clash.py").write_text(
        "from kdlab.methods.logit import KD\nfrom kdlab.methods.registry import register_method\n"
        "\n\n@register_method\nclass MyKD(KD):\n    name = 'kd'\n")
    with pytest.raises(PluginError, match=r"method 'kd' registered twice \(already by "
                                          r"kdlab\.methods\.logit\.KD\); give clash\.MyKD"):
        import_plugins(["clash.py"])
    assert get_method("kd").__module__ == "kdlab.methods.logit"


def test_plugin_imported_once_whatever_the_spelling(workdir: Path) -> None:
    (workdir / "counted.py").write_text(
        "from pathlib import Path\n"
        "from kdlab.models.registry import register_model\n"
        "from kdlab.models.cifar.resnet import resnet8\n"
        "register_model('counted_net')(resnet8)\n"
        "with open(Path(__file__).with_name('runs.txt'), 'a') as f:\n"
        "    f.write('x')\n")
    assert import_plugins(["counted", "counted", "counted.py", "./counted.py"]) == ["counted"] * 4
    assert import_plugins([str(workdir / "counted.py")]) == ["counted"]
    assert (workdir / "runs.txt").read_text() == "x"
    assert create_model("counted_net", num_classes=3).num_classes == 3


# --------------------------------------------------------------------------- registries
def test_did_you_mean_suggestions() -> None:
    with pytest.raises(ModelError) as err:
        create_model("resnt8")
    assert re.fullmatch(r"unknown model 'resnt8'; did you mean resnet8, [^?]+\? "
                        r"\(kdlab models lists all\)", str(err.value))
    assert str(err.value).count(",") <= 2  # at most three suggestions
    with pytest.raises(ModelError, match=r"^unknown model 'zzqqxx'; run 'kdlab models' to list "
                                         r"them$"):
        create_model("zzqqxx")
    with pytest.raises(MethodError, match=r"unknown method 'dkdd'; did you mean dkd\b.*"
                                          r"\(kdlab methods lists all\)"):
        get_method("dkdd")
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar1000'; did you mean cifar100"):
        load_dataset("cifar1000")
    with pytest.raises(ConfigError, match=r"data\.name.*unknown dataset 'cifar1000'; did you mean "
                                          r"cifar100"):
        load_config(None, ["student.arch=resnet8", "data.name=cifar1000"])
    assert load_config(None, ["student.arch=resnet8", "data.name=imagenet",
                              "data.root=/x"]).data.name == "imagenet"  # a streamed dataset


def test_registry_api_and_recursive_reentrant_discovery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "widgetpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from kdlab.core.errors import KdlabError\nfrom kdlab.core.registry import Registry\n"
        "WIDGETS = Registry('widget', KdlabError, packages=('widgetpkg',), "
        "list_hint='kdlab widgets')\n")
    (pkg / "alpha.py").write_text("from widgetpkg import WIDGETS\nWIDGETS.register('alpha', 1)\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "gamma.py").write_text(  # asks for the names while discovery imports it
        "from widgetpkg import WIDGETS\nSEEN = WIDGETS.names()\n"
        "WIDGETS.decorator('gamma')(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from widgetpkg import WIDGETS  # type: ignore[import-not-found]

        assert WIDGETS.names() == ["alpha", "gamma"]  # found without importing them by hand
        assert sys.modules["widgetpkg.sub.gamma"].SEEN == ["alpha"]
        assert "gamma" in WIDGETS and 5 not in WIDGETS and WIDGETS.get("alpha") == 1
        with pytest.raises(KdlabError, match=r"^widget 'alpha' registered twice"):
            WIDGETS.register("alpha", 2)
        with pytest.raises(KdlabError, match=r"did you mean alpha\? \(kdlab widgets lists all\)"):
            WIDGETS.get("alpah")
        assert WIDGETS.unregister("gamma") == 3 and WIDGETS.names() == ["alpha"]
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "widgetpkg"]:
            del sys.modules[name]


@pytest.mark.e2e
def test_builtin_entries_need_no_import_list() -> None:
    """In a fresh interpreter, the registries find every kdlab method, model and dataset."""
    code = ("from kdlab.methods.registry import list_methods\n"
            "from kdlab.models.registry import list_models\n"
            "from kdlab.data.registry import dataset_names\n"
            "print(len(list_methods('logit')), len(list_methods('partner')), "
            "'resnet8' in list_models(), 'MobileNetV2_imagenet' in list_models(), "
            "dataset_names())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split(maxsplit=4)
    # 8 + mlkd, dist, ttm, wttm, deit, ofa + the segmentation map methods cwd, sd_map
    assert out[:4] == ["16", "7", "True", "True"]
    assert "synthetic" in out[4] and "cifar100" in out[4]


# --------------------------------------------------------------------------- misbehaving plugins
DISTILL_CFG = ("student: {arch: resnet8}\nteacher: {arch: resnet14, random_init: true}\n"
               "data: {name: synthetic, synthetic: {n_train: 8, n_test: 8}}\n")


@pytest.mark.parametrize(("call", "shown"), [("sys.exit(0)", "sys.exit(0)"),
                                             ("sys.exit()", "sys.exit()"),
                                             ("raise SystemExit('bye')", "sys.exit('bye')")])
def test_plugin_ending_the_process_at_import_is_a_one_line_error(
        workdir: Path, capsys: pytest.CaptureFixture[str], call: str, shown: str) -> None:
    (workdir / "cfg.yaml").write_text(DISTILL_CFG)
    (workdir / "quitter.py").write_text(
        f"import sys\nprint('quitter says goodbye', file=sys.stderr)\n{call}\n")
    assert main(["distill", "cfg.yaml", "--plugin", "quitter.py"]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"kdlab: error: plugin 'quitter.py' could not be imported: it tried to end kdlab at "
        f"import ({shown} at {workdir.resolve() / 'quitter.py'}:3); a plugin may only define "
        "and register things"]
    assert "goodbye" not in out.err + out.out and "quitter" not in sys.modules
    assert not (workdir / "runs").exists()  # nothing trained


def test_plugin_parsing_the_command_line_at_import(workdir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A plugin's argparse at import sees only the program name (none of kdlab's arguments);
    one that then gives up is a one-line error, without its usage text."""
    (workdir / "cfg.yaml").write_text(DISTILL_CFG)
    (workdir / "argy.py").write_text(
        "import argparse\nparser = argparse.ArgumentParser(prog='argy')\n"
        "parser.add_argument('data_dir')\nARGS = parser.parse_args()\n")
    argv = list(sys.argv)
    assert main(["distill", "cfg.yaml", "--plugin", "argy"]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"kdlab: error: plugin 'argy' could not be imported: it parsed the command line at "
        f"import and argparse ended it (exit status 2 at {workdir.resolve() / 'argy.py'}:4); a "
        "plugin must not parse arguments at import: move that under "
        "`if __name__ == \"__main__\":`"]
    assert "usage" not in out.err + out.out and "data_dir" not in out.err + out.out
    assert sys.argv == argv and "argy" not in sys.modules
    # optional arguments only: it imports, seeing no kdlab argument; its own stderr output
    # (not an exit) is passed on
    (workdir / "lenient.py").write_text(
        "import argparse, sys\nfrom kdlab.models.cifar.resnet import resnet8\n"
        "from kdlab.models.registry import register_model\n"
        "SEEN = list(sys.argv)\n"
        "parser = argparse.ArgumentParser()\nparser.add_argument('--set', default='mine')\n"
        "ARGS = parser.parse_args()\nprint('lenient: hello', file=sys.stderr)\n"
        "register_model('lenient_net')(resnet8)\n")
    assert main(["config", "show", "cfg.yaml", "--set", "seed=3", "--plugin", "lenient.py"]) == 0
    out = capsys.readouterr()
    assert "lenient: hello" in out.err and "usage" not in out.err
    assert sys.modules["lenient"].SEEN == argv[:1] and sys.modules["lenient"].ARGS.set == "mine"
    assert sys.argv == argv and "lenient_net" in MODELS
