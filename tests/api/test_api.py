"""The Python API: kdlab.run gives the CLI's run bit for bit, kdlab.load_student gives back the
checkpoint's network, errors are one line, `import kdlab` stays light, the README example runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import kdlab
from kdlab.cli.main import main
from kdlab.core.errors import CheckpointError, ConfigError, RunError
from kdlab.models import create_model

pytestmark = pytest.mark.e2e  # trains runs end to end

SRC = Path(__file__).resolve().parents[2] / "src"
README = SRC.parent / "README.md"
#: figures that measure time, not the run
TIMING = {"train_img_per_s", "train_time_s", "eval_time_s", "wall_time_s"}

CONFIG: dict[str, Any] = {
    "name": "api",
    "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
             "synthetic": {"n_train": 32, "n_test": 16, "num_classes": 10}},
    "student": {"arch": "resnet8"},
    "optim": {"epochs": 2, "milestones": [1]},
    "runtime": {"threads": 2, "amp": "off", "log_every": 2},
}
OVERRIDES = ["optim.lr=0.1"]


def untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """CONFIG trained through kdlab.run (a dict config with overrides): (run dir, summary)."""
    run_dir = tmp_path_factory.mktemp("api") / "run"
    return run_dir, kdlab.run(CONFIG, overrides=OVERRIDES, run_dir=run_dir)


def test_run_on_a_dict_is_the_cli_run_bit_for_bit(api_run: tuple[Path, dict[str, Any]],
                                                  tmp_path: Path) -> None:
    api_dir, summary = api_run
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    cli_dir = tmp_path / "cli"
    args = ["-q", "train", str(path), "--run-dir", str(cli_dir), "--no-progress"]
    assert main([*args, *[a for o in OVERRIDES for a in ("--set", o)]]) == 0
    cli_summary = json.loads((cli_dir / "summary.json").read_text())
    assert summary["best_top1"] == cli_summary["best_top1"]
    assert untimed([summary]) == untimed([cli_summary])
    assert summary == json.loads((api_dir / "summary.json").read_text())
    assert untimed(metrics(api_dir)) == untimed(metrics(cli_dir))
    assert metrics(api_dir)[0]["lr"] == 0.1
    a = torch.load(api_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    b = torch.load(cli_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("which", ["best", "last"])
def test_load_student_gives_the_checkpoint_network(api_run: tuple[Path, dict[str, Any]],
                                                   which: str) -> None:
    run_dir, _ = api_run
    student = kdlab.load_student(run_dir, which)
    assert not student.training and student.arch == "resnet8"
    reference = create_model("resnet8", num_classes=10)
    state = torch.load(run_dir / "checkpoints" / f"{which}.pt", weights_only=True)["model"]
    reference.load_state_dict(state)
    reference.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(images).logits, reference(images).logits)


def test_resume_continues_and_a_finished_run_returns_its_summary(
        api_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, full = api_run
    run_dir = tmp_path / "run"
    stopped = kdlab.run(CONFIG, OVERRIDES, run_dir, stop_after=1)
    assert stopped["epochs"] == 1 and not (run_dir / "summary.json").exists()
    resumed = kdlab.run(CONFIG, OVERRIDES, run_dir, resume=True)
    assert resumed["epochs"] == 2 and resumed["best_top1"] == full["best_top1"]
    again = kdlab.run(CONFIG, OVERRIDES, run_dir)  # finished: nothing is trained again
    assert again == json.loads((run_dir / "summary.json").read_text())
    assert len(metrics(run_dir)) == 2


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


def test_errors_are_one_line(api_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, _ = api_run
    with pytest.raises(RunError) as e:
        kdlab.load_student(tmp_path / "nothing")
    assert "is not a kdlab run directory" in one_line(e)
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    best = broken / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        kdlab.load_student(broken)
    assert "best.pt" in one_line(e)
    best.unlink()
    with pytest.raises(CheckpointError) as e:
        kdlab.load_student(broken)
    assert "checkpoint='last'" in one_line(e)
    with pytest.raises(ConfigError) as e:
        kdlab.run({**CONFIG, "optim": {"lr": -1}}, run_dir=tmp_path / "bad")
    assert "optim.lr" in one_line(e)
    with pytest.raises(ConfigError) as e:
        kdlab.run({**CONFIG, "_base_": "base.yaml"}, run_dir=tmp_path / "bad")
    assert "_base_" in one_line(e)
    with pytest.raises(ConfigError) as e:
        kdlab.run(42, run_dir=tmp_path / "bad")  # type: ignore[arg-type]
    assert "a YAML file path or a dict" in one_line(e)
    assert not (tmp_path / "bad").exists()


def test_import_kdlab_stays_light() -> None:
    code = ("import sys, kdlab; print('torch' in sys.modules, 'kdlab.api' in sys.modules); "
            "print(kdlab.run.__module__, kdlab.load_student.__name__, 'kdlab.api' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.split("\n")[:2] == ["False False", "kdlab.api load_student True"]


def test_readme_python_api_example_runs(tmp_path: Path) -> None:
    """The README's block after ``<!-- readme-example: python-api -->``, as written, in a fresh
    interpreter and an empty folder."""
    found = re.search(r"<!-- readme-example: python-api -->\n```python\n(.*?)\n```\n",
                      README.read_text(), re.S)
    assert found, "README.md has no python-api example"
    (tmp_path / "example.py").write_text(found.group(1) + "\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = re.fullmatch(r"best top-1 (\d+\.\d\d) at epoch (\d) \(resnet8\)\n", done.stdout)
    assert shown, done.stdout
    summary = json.loads((tmp_path / "runs" / "api-example" / "summary.json").read_text())
    assert f"{summary['best_top1']:.2f}" == shown.group(1)
    assert (tmp_path / "runs" / "api-example" / "epochs.csv").exists()


def test_run_logs_one_line_per_epoch_by_default(tmp_path: Path) -> None:
    """A script that configures no logging still sees ``kdlab.run``'s epoch lines (issue 23),
    one per epoch, no per-step lines, and the ``kdlab`` logger is left as it was."""
    code = ("import logging, sys, kdlab\n"
            f"kdlab.run({CONFIG!r}, {OVERRIDES!r}, run_dir=sys.argv[1])\n"
            "log = logging.getLogger('kdlab')\n"
            "print(len(log.handlers), log.level)\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    epoch_lines = [x for x in out.stderr.splitlines() if re.match(r"epoch \d+: loss", x)]
    assert len(epoch_lines) == 2, out.stderr
    assert "step" not in out.stderr
    assert out.stdout.split() == ["0", "0"]
