"""`kdlab latency`: the table's structure (a row per model x runtime x batch size, p50 <= p90),
parameters and MACs against independent counts, the protocol's minimums, skipped runtimes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kdlab.cli.main import main
from kdlab.deploy.latency import summarize
from kdlab.models import create_model

NUM_CLASSES = 4
SIZE = 16
SHORT = ["--runs", "3", "--warmup", "1", "--allow-short", "--threads", "1"]


def conv_macs(c_in: int, c_out: int, k: int, h_out: int) -> int:
    return c_in * c_out * k * k * h_out * h_out


def cifar_resnet_macs(depth: int, widths: tuple[int, int, int, int], c_in: int, size: int,
                      classes: int) -> int:
    """MACs of He et al.'s CIFAR ResNet (depth 6n+2) counted by hand from the architecture:
    3x3 stem; three stages of n basic blocks (two 3x3 convs; the first block of a stage with
    stride 2 (stages 2, 3) and a 1x1 stride-2 shortcut conv when the shape changes); a linear
    head on the pooled features. 3x3 convs have padding 1, so h_out = ceil(h / stride)."""
    n = (depth - 2) // 6
    h = size
    macs = conv_macs(c_in, widths[0], 3, h)
    c = widths[0]
    for out, stride in zip(widths[1:], (1, 2, 2), strict=True):
        for b in range(n):
            s = stride if b == 0 else 1
            h = -(-h // s)
            macs += conv_macs(c, out, 3, h) + conv_macs(out, out, 3, h)
            if b == 0 and (s != 1 or c != out):
                macs += conv_macs(c, out, 1, h)
            c = out
    return macs + c * classes


def test_summarize_percentiles() -> None:
    r = summarize([float(v) for v in range(10, 0, -1)])  # 1..10 in any order
    assert r == {"p50_ms": 5.5, "p90_ms": pytest.approx(9.1), "min_ms": 1.0, "mean_ms": 5.5}


@pytest.mark.e2e
def test_latency_table(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lat"
    runtimes = ["eager", "onnxruntime"]
    assert main(["-q", "latency", str(tiny_run), *SHORT, "--batch-sizes", "1", "3",
                 "--runtimes", *runtimes, "--out", str(out)]) == 0
    result = json.loads((out / "latency.json").read_text())
    rows = result["rows"]
    keys = [(r["model"], r["runtime"], r["batch_size"]) for r in rows]
    assert sorted(keys) == sorted((m, rt, bs) for m in ("teacher", "student")
                                  for rt in runtimes for bs in (1, 3))
    expected = {"teacher": ("resnet14", 14), "student": ("resnet8", 8)}
    for r in rows:
        assert "error" not in r, r
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"]
        assert len(r["times_ms"]) == 3 and r["runs"] == 3 and r["warmup"] == 1
        assert r["threads"] == 1 and r["precision"] == "fp32"
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["p50_ms"])
        arch, depth = expected[r["model"]]
        model = create_model(arch, num_classes=NUM_CLASSES, in_channels=3)
        assert r["arch"] == arch
        assert r["parameters"] == sum(p.numel() for p in model.parameters())
        assert r["macs_per_image"] == cifar_resnet_macs(depth, (16, 16, 32, 64), 3, SIZE,
                                                        NUM_CLASSES)
    assert cifar_resnet_macs(8, (16, 16, 32, 64), 3, SIZE, NUM_CLASSES) == 3_125_504
    assert {(s["runtime"], s["batch_size"]) for s in result["speedup"]} == {
        (rt, bs) for rt in runtimes for bs in (1, 3)}
    for s in result["speedup"]:
        assert s["speedup"] == pytest.approx(s["teacher_p50_ms"] / s["student_p50_ms"])
    assert result["machine"]["cpu_model"] and "avx2" in result["machine"]["cpu_flags"]
    assert result["versions"]["torch"] and result["date"]
    md = (out / "latency.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith(("| teacher", "| student"))]
    assert len(table) == len(rows)
    assert "Student speed-up over the teacher" in md


@pytest.mark.e2e
def test_protocol_minimums(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["latency", str(tiny_run), "--runs", "3", "--warmup", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlab: error: the protocol needs --runs >= 30 and --warmup >= 5")
    assert len(err.splitlines()) == 1
    assert main(["latency", str(tiny_run), *SHORT, "--runtimes", "tvm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown runtime 'tvm'" in err and len(err.splitlines()) == 1


@pytest.mark.e2e
def test_missing_runtime_is_skipped(tiny_run: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["-q", "latency", str(tiny_run), *SHORT, "--batch-sizes", "1",
                 "--runtimes", "onnxruntime", "eager", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "latency.json").read_text())
    assert {r["runtime"] for r in result["rows"]} == {"eager"} and len(result["rows"]) == 2
    assert any(n.startswith("onnxruntime skipped: onnxruntime not installed")
               and "'.[export]'" in n for n in result["notes"])
    assert "onnxruntime skipped" in (tmp_path / "latency.md").read_text()
