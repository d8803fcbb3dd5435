"""Bad input: one line ``kdlab: error: ...`` naming the problem, a non-zero exit, no traceback;
``--debug`` shows the traceback instead."""

from __future__ import annotations

import gzip
import pickle
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdlab.config import MethodConfig, load_config
from kdlab.core.errors import KdlabError, MethodError
from kdlab.data.cifar import CIFAR_SPECS
from kdlab.methods import DistillContext, build_method
from kdlab.models import create_model
from kdlab.runs.rundir import RunDir

from .conftest import child_env, cli

Setup = Callable[[Path, Callable[..., Path]], tuple[list[str], str]]


def _cifar_folder(root: Path, n: int = 20) -> Path:
    """A tiny but well-formed CIFAR-10 folder (every file the loader needs)."""
    spec = CIFAR_SPECS["cifar10"]
    folder = root / spec.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in spec.files:
        if name == spec.meta_file:
            obj: dict[bytes, Any] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
        else:
            obj = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                   b"labels": [int(x) for x in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return folder


def _idx(path: Path, magic: int, dims: tuple[int, ...], n_bytes: int | None = None) -> None:
    n = int(np.prod(dims)) if n_bytes is None else n_bytes
    path.write_bytes(struct.pack(f">I{len(dims)}I", magic, *dims) + bytes(n))


def _fashion(root: Path, images_magic: int = 0x803, image_bytes: int | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 16), ("t10k", 8)):
        _idx(root / f"{prefix}-images-idx3-ubyte", images_magic, (n, 28, 28), image_bytes)
        _idx(root / f"{prefix}-labels-idx1-ubyte", 0x801, (n,))


def missing_dataset(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    cfg = write_cfg(tmp, data={"name": "cifar10", "root": str(tmp / "nowhere")})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "CIFAR-10 not found"


def cifar_wrong_pickle(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    folder = _cifar_folder(tmp / "data")
    (folder / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    cfg = write_cfg(tmp, data={"name": "cifar10", "root": str(tmp / "data")})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "expected a pickled dict"


def cifar_truncated(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    folder = _cifar_folder(tmp / "data")
    data = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(data[: len(data) // 2])
    cfg = write_cfg(tmp, data={"name": "cifar10", "root": str(tmp / "data")})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "data_batch_2"


def idx_wrong_magic(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    _fashion(tmp / "fm", images_magic=0x801)
    cfg = write_cfg(tmp, data={"name": "fashion_mnist", "root": str(tmp / "fm")})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "wrong IDX magic number"


def idx_wrong_size(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    _fashion(tmp / "fm", image_bytes=100)
    cfg = write_cfg(tmp, data={"name": "fashion_mnist", "root": str(tmp / "fm")})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "is truncated"


def idx_gzip_truncated(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    _fashion(tmp / "fm")
    raw = (tmp / "fm" / "train-labels-idx1-ubyte").read_bytes()
    (tmp / "fm" / "train-labels-idx1-ubyte").unlink()
    gz = gzip.compress(raw)
    (tmp / "fm" / "train-labels-idx1-ubyte.gz").write_bytes(gz[: len(gz) - 6])
    cfg = write_cfg(tmp, data={"name": "fashion_mnist", "root": str(tmp / "fm")})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "truncated or corrupt gzip"


def unreadable_images(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp / "imgs" / split / cls).mkdir(parents=True)
            for i in range(4):
                (tmp / "imgs" / split / cls / f"{i}.png").write_bytes(b"not a png at all")
    cfg = write_cfg(tmp, teacher=None, method={"name": "vanilla", "partners": []},
                    data={"name": "folder", "root": str(tmp / "imgs"), "on_error": "stop",
                          "num_workers": 0, "image_size": 16, "resize": 18,
                          "batch_size": 4, "eval_batch_size": 4})
    return ["train", str(cfg), "--run-dir", str(tmp / "run")], "cannot read image"


def folder_without_split(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    """Class folders with no train/ and val/: no test set (it would be the training images)."""
    for cls in ("a", "b"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            (tmp / "imgs" / cls / f"{i}.png").write_bytes(b"not read: the split is checked first")
    cfg = write_cfg(tmp, teacher=None, method={"name": "vanilla", "partners": []},
                    data={"name": "folder", "root": str(tmp / "imgs"), "num_workers": 0,
                          "image_size": 16, "resize": 18})
    return ["train", str(cfg), "--run-dir", str(tmp / "run")], "has no train/ and val/"


def teacher_without_weights(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    """No checkpoint, no pretrained weights: distilling from a random teacher needs a flag."""
    cfg = write_cfg(tmp, teacher={"checkpoint": None})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "teacher.random_init: true"


def teacher_random_and_checkpoint(tmp: Path, write_cfg: Callable[..., Path]
                                  ) -> tuple[list[str], str]:
    cfg = write_cfg(tmp, teacher={"random_init": True})  # the suite's teacher has a checkpoint
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "random_init: true means"


def teacher_other_arch(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    torch.save({"model": create_model("resnet20", num_classes=4).state_dict()}, tmp / "t20.pth")
    cfg = write_cfg(tmp, teacher={"checkpoint": str(tmp / "t20.pth")})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "another architecture"


def teacher_other_class_count(tmp: Path, write_cfg: Callable[..., Path]
                              ) -> tuple[list[str], str]:
    """A teacher trained on 100 classes for a 4-class run: teacher and student would disagree on
    the class count; the classifier-shape check names it."""
    torch.save({"model": create_model("resnet14", num_classes=100).state_dict()},
               tmp / "t100.pth")
    cfg = write_cfg(tmp, teacher={"checkpoint": str(tmp / "t100.pth")})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], \
        "class count: checkpoint 100, model 4"


def unknown_key(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    cfg = write_cfg(tmp, optim={"lrr": 0.1})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "optim.lrr"


def wrong_type(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    cfg = write_cfg(tmp)
    return ["distill", str(cfg), "--set", "optim.lr=fast", "--run-dir", str(tmp / "run")], \
        "optim.lr"


def out_of_range(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    cfg = write_cfg(tmp)
    return ["distill", str(cfg), "--set", "data.batch_size=0", "--run-dir", str(tmp / "run")], \
        "data.batch_size"


def sdd_scales_too_large(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    # resnet8's last map is 8x8 on 32x32 inputs: 12 is neither <= 8 nor a multiple of 8
    cfg = write_cfg(tmp, method={"params": {"scales": [1, 2, 12]}})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "SDD scale 12 does not fit"


def other_run_in_dir(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    other = write_cfg(tmp, name="other.yaml", seed=7)
    RunDir(tmp / "run").prepare(load_config(other), resume=False)
    cfg = write_cfg(tmp)
    return ["distill", str(cfg), "--run-dir", str(tmp / "run"), "--resume"], \
        "holds a different run"


def not_a_run_dir(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("mine")
    cfg = write_cfg(tmp)
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], "is not a kdlab run"


def sdd_one_by_one_map(tmp: Path, write_cfg: Callable[..., Path]) -> tuple[list[str], str]:
    # vgg8's last map is 1x1 on 8x8 inputs: every SDD region would be the global one
    cfg = write_cfg(tmp, student={"arch": "vgg8"}, data={"synthetic": {"size": 8}})
    return ["distill", str(cfg), "--run-dir", str(tmp / "run")], \
        "sd_dkd: the student vgg8 has a 1x1 final feature map at 8 px"


CASES: dict[str, Setup] = {f.__name__: f for f in (
    missing_dataset, cifar_wrong_pickle, cifar_truncated, idx_wrong_magic, idx_wrong_size,
    idx_gzip_truncated, unreadable_images, folder_without_split, teacher_without_weights,
    teacher_random_and_checkpoint, teacher_other_arch, teacher_other_class_count,
    unknown_key, wrong_type, out_of_range, sdd_scales_too_large, sdd_one_by_one_map,
    other_run_in_dir, not_a_run_dir)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case: str, tmp_path: Path, write_cfg: Callable[..., Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = CASES[case](tmp_path, write_cfg)
    capsys.readouterr()
    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kdlab: error:"), err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    if case not in ("other_run_in_dir", "not_a_run_dir"):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)  # the failed run would need --resume
    with pytest.raises(KdlabError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        cli(["--debug", *argv])


@pytest.mark.e2e
def test_real_process_one_line_and_debug_traceback(tmp_path: Path,
                                                   write_cfg: Callable[..., Path]) -> None:
    """The same through ``python -m kdlab``: stderr is one line; ``--debug`` prints the
    traceback."""
    argv, expected = teacher_other_class_count(tmp_path, write_cfg)
    base = [sys.executable, "-m", "kdlab", "-q"]
    plain = subprocess.run([*base, *argv], capture_output=True, text=True, env=child_env(),
                           timeout=120)
    assert plain.returncode == 2
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error:") and expected in lines[0], \
        plain.stderr
    argv[-1] = str(tmp_path / "run2")
    debug = subprocess.run([*base, "--debug", *argv], capture_output=True, text=True,
                           env=child_env(), timeout=120)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "CheckpointError" in debug.stderr


# --------------------------------------------------------------------------- malformed config files
#: name -> (the file's content, None for a directory given as the file; what the line says).
MALFORMED: dict[str, tuple[str | bytes | None, str]] = {
    "duplicate_key": ("optim:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n",
                      "line 4: duplicate key 'lr' (first at line 2)"),
    "duplicate_nested_key": ("method:\n  params:\n    beta: 1\n    beta: 2\n",
                             "line 4: duplicate key 'beta' (first at line 3)"),
    "top_level_list": ("- optim\n- lr\n", "must hold a mapping"),
    "not_utf8": (b"name: caf\xe9\n", "line 1 is not UTF-8 text (byte 0xe9)"),
    "invalid_yaml": ("optim: {lr: 0.1\nseed: 2\n", "is not valid YAML"),
    "empty": ("", "config key 'student' is required"),
    "directory": (None, "is a directory"),
    "base_number": ("_base_: 3\n",
                    "_base_ must be a path or a list of paths (strings), found a number (3)"),
    "base_mapping": ("_base_: {file: a.yaml}\n", "found a mapping ({'file': 'a.yaml'})"),
    "base_list_non_string": ("_base_: [a.yaml, 7]\n", "found a number (7) as item 1 of the list"),
    "base_missing": ("_base_: nowhere.yaml\n", "_base_ 'nowhere.yaml' not found"),
}
#: what differs for a sweep spec (which has no ``_base_``)
SWEEP_EXPECTED = {"empty": "must hold a mapping with name, configs"}
COMMANDS = {"distill": ["distill"], "config_show": ["config", "show"], "sweep": ["sweep"]}


def _malformed(tmp: Path, case: str) -> Path:
    content = MALFORMED[case][0]
    path = tmp / "bad.yaml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(("command", "case"), [
    (command, case) for command in COMMANDS for case in MALFORMED
    if not (command == "sweep" and case.startswith("base_"))])
def test_malformed_config_file_is_one_line(command: str, case: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Duplicate keys, a bad ``_base_``, a list at the top, non-UTF-8 bytes, an empty file, a
    directory: ``kdlab distill``, ``kdlab config show`` and ``kdlab sweep`` each print one line
    naming the file (the file that asked, for a missing base) and exit 2."""
    path = _malformed(tmp_path, case)
    expected = SWEEP_EXPECTED.get(case, MALFORMED[case][1]) if command == "sweep" \
        else MALFORMED[case][1]
    argv = [*COMMANDS[command], str(path)]
    if command == "distill":
        argv += ["--run-dir", str(tmp_path / "run")]
    capsys.readouterr()
    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error:"), err
    assert "Traceback" not in err
    assert expected in lines[0] and path.name in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
    with pytest.raises(KdlabError, match=re.escape(expected)):
        cli(["--debug", *argv])


@pytest.mark.e2e
@pytest.mark.parametrize(("command", "case"), [
    ("distill", "duplicate_key"), ("config_show", "base_number"), ("sweep", "not_utf8")])
def test_malformed_config_file_real_process(command: str, case: str, tmp_path: Path) -> None:
    """The same through ``python -m kdlab``: one line on stderr, exit 2."""
    path = _malformed(tmp_path, case)
    proc = subprocess.run([sys.executable, "-m", "kdlab", "-q", *COMMANDS[command], str(path)],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error:"), proc.stderr
    assert MALFORMED[case][1] in lines[0], lines[0]


# --------------------------------------------------------------------------- SDD on a 1x1 map
@pytest.mark.parametrize(("student", "teacher", "who"), [("vgg8", "resnet8", "student"),
                                                         ("resnet8", "vgg8", "teacher")])
def test_sdd_on_a_one_by_one_map_is_a_method_error(student: str, teacher: str, who: str) -> None:
    """vgg8's final map is 1x1 on 8 px inputs, where every SDD region is a copy of the global
    one: building any SD-X method is a MethodError naming the model and the map, not X in
    disguise. Scales [1] (no local regions asked for) and a larger input are fine."""
    s, t = create_model(student, num_classes=4), create_model(teacher, num_classes=4)
    assert tuple(create_model("vgg8", num_classes=4).probe(8).feature_map.shape[-2:]) == (1, 1)
    assert tuple(create_model("resnet8", num_classes=4).probe(8).feature_map.shape[-2:]) == (2, 2)
    ctx = DistillContext.from_models(s, t, num_classes=4, train_labels=torch.arange(16) % 4,
                                     input_size=8)
    for name, base in (("sd_kd", "kd"), ("sd_dkd", "dkd"), ("sd_nkd", "nkd")):
        with pytest.raises(MethodError) as e:
            build_method(MethodConfig(name=name), ctx)
        assert str(e.value) == (
            f"{name}: the {who} vgg8 has a 1x1 final feature map at 8 px, so every SDD region "
            "equals the global one; use a larger input or a model with a larger final map "
            f"(or {base})")
    build_method(MethodConfig(name="sd_dkd", params={"scales": [1]}), ctx)
    ctx16 = DistillContext.from_models(s, t, num_classes=4, train_labels=torch.arange(16) % 4,
                                       input_size=16)  # vgg8: 2x2, resnet8: 4x4
    build_method(MethodConfig(name="sd_dkd"), ctx16)


# --------------------------------------------------------------------------- misspelt names
@pytest.mark.parametrize(("changes", "unknown", "right"), [
    ({"student": {"arch": "resnt8"}}, "model 'resnt8'", "resnet8"),
    ({"method": {"name": "sd_dkdd"}}, "method 'sd_dkdd'", "sd_dkd"),
    ({"data": {"name": "synthetc"}}, "dataset 'synthetc'", "synthetic"),
], ids=["model", "method", "dataset"])
def test_misspelt_name_suggests_the_right_one(changes: dict[str, Any], unknown: str, right: str,
                                              tmp_path: Path, write_cfg: Callable[..., Path],
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt model, method or dataset in a config given to ``kdlab distill``: one line,
    "did you mean" with the intended name first, under 200 characters (the config is given by
    a short relative path, as users type it)."""
    write_cfg(tmp_path, name="c.yaml", **changes)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli(["distill", "c.yaml", "--run-dir", "run"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error:"), err
    assert f"unknown {unknown}; did you mean {right}" in lines[0], lines[0]
    assert len(lines[0]) < 200, lines[0]
