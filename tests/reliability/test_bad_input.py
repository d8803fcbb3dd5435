"""Bad input: one line ``kdlab: error: ...`` naming the problem, a non-zero exit, no traceback;
``--debug`` shows the traceback instead."""

from __future__ import annotations

import gzip
import pickle
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

from kdlab.config import load_config
from kdlab.data.cifar import CIFAR_SPECS
from kdlab.engine.rundir import RunDir
from kdlab.errors import KdlabError
from kdlab.models import create_model

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
    for cls in ("a", "b"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            (tmp / "imgs" / cls / f"{i}.png").write_bytes(b"not a png at all")
    cfg = write_cfg(tmp, teacher=None, method={"name": "vanilla", "partners": []},
                    data={"name": "folder", "root": str(tmp / "imgs"), "on_error": "stop",
                          "num_workers": 0, "image_size": 16, "resize": 18,
                          "batch_size": 4, "eval_batch_size": 4})
    return ["train", str(cfg), "--run-dir", str(tmp / "run")], "cannot read image"


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


CASES: dict[str, Setup] = {f.__name__: f for f in (
    missing_dataset, cifar_wrong_pickle, cifar_truncated, idx_wrong_magic, idx_wrong_size,
    idx_gzip_truncated, unreadable_images, teacher_other_arch, teacher_other_class_count,
    unknown_key, wrong_type, out_of_range, sdd_scales_too_large, other_run_in_dir,
    not_a_run_dir)}


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
