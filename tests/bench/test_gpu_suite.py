"""``benchmarks/gpu_suite.sh`` (the GPU figures of issue 5) runs end to end, shrunk to a CPU smoke
test: every command line in it is accepted and every measurement writes its JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the GPU suite script (kdlab bench processes) on CPU

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_smoke_on_cpu(tmp_path: Path) -> None:
    env = dict(os.environ, PAIR="--teacher resnet8 --student resnet8", EPOCH_IMAGES="32",
               BATCHES="16 32", STEPS="1", GRID_BATCHES="8", GRID_SIZES="16", EVAL_SIZE="16",
               WARMUP="1", ROUNDS="1", COMPILE="0", MEMORY="0", WORKERS="1")
    # the suite uses the project's venv when there is one, else the python on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(SUITE), str(out), "cpu"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for b, steps in ((16, 2), (32, 1)):  # one epoch of >= 32 images per batch size
        r = json.loads((out / f"epoch_b{b}_eager.json").read_text())
        assert r["config"]["batch_size"] == b and r["train"]["steps_per_round"] == steps
        assert r["config"]["teacher"] == "resnet8" and r["eval"]["images"] == 16
    fp32 = json.loads((out / "epoch_b16_fp32.json").read_text())
    assert fp32["config"]["amp_dtype"] is None
    assert json.loads((out / "epoch_b16_nchw.json").read_text())["config"]["channels_last"] is False
    sdd = json.loads((out / "sdd_124.json").read_text())["sdd"]
    assert sdd["scales"] == [1, 2, 4] and set(sdd["median_step_ms"]) == {"kd", "sd_kd", "dkd",
                                                                          "sd_dkd"}
    compare = json.loads((out / "compare.json").read_text())
    assert compare["pair"] == "resnet8->resnet8" and compare["speedup_classic_over_kdlab"] > 0
    assert json.loads((out / "scaling.json").read_text())["grid"][0]["batch"] == 8
    assert "memory" not in json.loads((out / "scaling.json").read_text())
    assert "gpu_suite done" in (out / "suite.log").read_text()
    # no second device here: the 2-rank NCCL step says so instead of running
    assert "the 2-rank NCCL step needs two; not run" in (out / "ddp.txt").read_text()
