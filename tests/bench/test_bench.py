"""``kdlab bench``, the classic reference pipeline and the fast-vs-plain loss check (fast, tiny
pair resnet14 -> resnet8; no timed assertions)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from kdlab.bench import PART_NAMES, check_losses, peak_tflops
from kdlab.cli.main import main

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

TOP_KEYS = {"kind", "config", "machine", "load_avg_1m_start", "load_avg_1m_end", "train",
            "parts", "memory", "eval", "flops"}
#: total-loss tolerance of the fast path (bf16 autocast + channels_last) vs plain fp32
RTOL, ATOL = 1e-2, 1e-3


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "b.json"
    argv = ["-q", "bench", "--teacher", "resnet14", "--student", "resnet8", "--method", "kd",
            "--batch-size", "8", "--num-classes", "10", "--device", "cpu", "--amp", "off",
            "--threads", "2", "--steps", "3", "--warmup", "1", "--part-steps", "2",
            "--eval-size", "16", "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


@pytest.mark.e2e
def test_bench_writes_expected_json(bench_json: dict) -> None:
    r = bench_json
    assert TOP_KEYS <= set(r)
    assert r["train"]["steps_per_round"] == 3 and r["train"]["img_per_s"] > 0
    assert set(r["parts"]["ms"]) == set(PART_NAMES)
    assert r["memory"]["kind"] == "peak_rss" and r["memory"]["peak_mb"] > 0
    assert r["eval"]["images"] == 16
    assert r["flops"]["per_step"] > 0 and r["flops"]["tflops_achieved"] > 0
    assert "fraction_of_peak" not in r["flops"]  # no GPU: no peak ratio
    m = r["machine"]
    for key in ("torch", "cpu_model", "torch_threads", "gpu", "date", "load_avg_1m"):
        assert key in m
    assert r["config"]["amp_dtype"] is None and r["config"]["batch_size"] == 8


@pytest.mark.e2e
def test_part_shares_sum_to_one(bench_json: dict) -> None:
    shares = bench_json["parts"]["share"]
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-9)
    assert all(v >= 0 for v in shares.values())
    assert math.isclose(sum(bench_json["parts"]["ms"].values()), bench_json["parts"]["step_ms"],
                        rel_tol=1e-9)


@pytest.mark.e2e
def test_bench_sdd_method_with_override(tmp_path: Path) -> None:
    out = tmp_path / "sdd.json"
    argv = ["-q", "bench", "--teacher", "resnet14", "--student", "resnet8", "--method",
            "sd_dkd", "--set", "method.params.scales=[1,2]", "--batch-size", "8",
            "--num-classes", "10", "--device", "cpu", "--amp", "off", "--no-channels-last",
            "--steps", "2", "--warmup", "0", "--eval-size", "0", "--no-flops",
            "--json", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["config"]["channels_last"] is False and r["eval"] == {} and r["flops"] == {}


def test_peak_table() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert peak_tflops("Some Future GPU") is None and peak_tflops(None) is None


def test_classic_pipeline_runs_two_steps() -> None:
    from classic_pipeline import ClassicPipeline

    torch.set_num_threads(2)
    pipe = ClassicPipeline("resnet14", "resnet8", "dkd", batch_size=8, num_classes=10,
                           n_train=32, num_workers=0)
    assert pipe.run(2) > 0
    assert math.isfinite(pipe.last_loss)
    x, y, i = pipe.loader.dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


@pytest.mark.parametrize("method", ["kd", "dkd", "sd_dkd", "dckd"])
def test_fast_path_loss_matches_plain(method: str) -> None:
    params = {"scales": [1, 2]} if method.startswith("sd_") else None
    r = check_losses(method, teacher="resnet14", student="resnet8", batch_size=8,
                     num_classes=10, params=params)
    plain, fast = r["plain"]["total"], r["fast"]["terms"]["total"]
    assert math.isfinite(plain) and math.isfinite(fast)
    assert abs(fast - plain) <= ATOL + RTOL * abs(plain)
    assert r["fp32_channels_last"]["max_rel"] < 1e-4  # the layout alone changes ~nothing


def test_bench_compile_flag_takes_an_optional_mode() -> None:
    from kdlab.cli.main import build_parser

    parse = build_parser().parse_args
    assert parse(["bench"]).compile is None
    assert parse(["bench", "--compile"]).compile == "default"
    assert parse(["bench", "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    with pytest.raises(SystemExit):
        parse(["bench", "--compile", "cudagraphs"])
