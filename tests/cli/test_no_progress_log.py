"""``--no-progress``: no bar, one log line every ``runtime.log_every`` steps (and at an epoch's
last step) plus the end-of-epoch line, so batch jobs that write to files show progress."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from kdlab.cli.main import main
from kdlab.engine.progress import TqdmProgress, format_figures

STEP_LINE = re.compile(r"^epoch (\d+)/(\d+) step (\d+)/(\d+) loss \d+\.\d{4} acc [\d.]+ "
                       r"img_s \d+$")


@pytest.mark.e2e
def test_cli_logs_a_line_every_log_every_steps(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    cfg = {
        "name": "noprog",
        "data": {"name": "synthetic", "batch_size": 4, "eval_batch_size": 16,
                 "synthetic": {"n_train": 20, "n_test": 8, "num_classes": 4}},
        "student": {"arch": "resnet8"},
        "optim": {"epochs": 2, "milestones": [], "lr": 0.01},
        "runtime": {"threads": 1, "amp": "off", "log_every": 2},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    caplog.set_level(logging.INFO, logger="kdlab")
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    steps = [STEP_LINE.match(m) for m in messages if m.startswith("epoch ") and " step " in m]
    assert all(steps), [m for m in messages if " step " in m]
    # 20 images / batch 4 = 5 steps per epoch: lines at steps 2, 4 and 5 (the last), 2 epochs
    got = [(int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in steps if m]
    assert got == [(e, 2, s, 5) for e in (1, 2) for s in (2, 4, 5)]
    ends = [m for m in messages if re.match(r"^epoch \d+: loss ", m)]
    assert len(ends) == 2


def test_figures_are_formatted_whatever_their_keys(caplog: pytest.LogCaptureFixture) -> None:
    info = {"loss": 1.23456, "acc": 61.234, "img_s": 812.4, "mse": 0.012345, "miou": 45.67}
    assert format_figures(info) == "loss 1.2346 acc 61.2 img_s 812 mse 0.01235 miou 45.7"
    caplog.set_level(logging.INFO, logger="kdlab")
    plain = TqdmProgress(enabled=False)
    plain.start_epoch(3, 240, 782)
    plain.update(150, info)
    assert caplog.records[-1].getMessage() == (
        "epoch 3/240 step 150/782 loss 1.2346 acc 61.2 img_s 812 mse 0.01235 miou 45.7")
    # the bar takes any keys too (a task without "acc")
    bar = TqdmProgress(enabled=True)
    bar.start_epoch(1, 1, 10)
    bar.update(5, {"loss": 0.5, "mse": 0.25})
    assert bar.bar.postfix == "loss=0.5000, mse=0.25"
    bar.bar.close()
