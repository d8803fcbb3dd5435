"""kdlab's ViT students in `kdlab export` and `kdlab latency`, with the CNN students' guarantees.

A tiny run distils resnet8 (random weights) into vit_tiny on 16x16 synthetic images, so the
student resamples its 8x8 position embeddings to a 4x4 grid (vit.py: only when the input size
differs from ``img_size``). Its artefacts are read back and compared with the eager student to
1e-5 (the parity report and batches of 1 and 7). Model-level checks add vit_lite_7_gap at its
native 32 px (no resampling), the MAC count of attention and the int8 refusal.

TorchScript is an expected failure until ``kdlab.models.vit.resample_pos_embed`` stops calling
``round()`` on a size that ``torch.jit.trace`` hands over as a Tensor (docs/deployment.md,
"Vision transformers"); the marks are strict, so the fix turns them into failures to remove.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.deploy.export import (
    EXTENSIONS,
    ExportError,
    LogitsOnly,
    check_parity,
    export_run,
    load_artefact,
    quantize_int8,
    save_exported,
    save_onnx,
    save_torchscript,
)
from kdlab.deploy.latency import LatencySettings, count_macs, run_latency
from kdlab.models import create_model
from kdlab.models.vit import VisionTransformer
from support import synthetic_distill_run

NUM_CLASSES = 4
SIZE = 16
N_TEST = 23  # eval batches of 16 and 7
STUDENT, TEACHER = "vit_tiny", "resnet8"
TOL = 1e-5


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_distill_run(tmp_path_factory.mktemp("vit_export_run"), STUDENT, TEACHER,
                                 {"name": "kd"}, n_test=N_TEST, num_classes=NUM_CLASSES,
                                 size=SIZE)


@pytest.fixture(scope="module")
def vit_student(vit_run: Path) -> torch.nn.Module:
    """The run's student rebuilt without kdlab.deploy: zoo model + best.pt weights."""
    model = create_model(STUDENT, num_classes=NUM_CLASSES, in_channels=3)
    best = torch.load(vit_run / "checkpoints" / "best.pt", weights_only=True)
    model.load_state_dict(best["model"])
    return model.eval()


def inputs(batch: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + batch))


def assert_parity(fn: Any, model: torch.nn.Module, size: int) -> float:
    """``fn`` equals ``model``'s logits to TOL at batch 1 and 7 (the batch is dynamic); the
    largest difference seen."""
    worst = 0.0
    with torch.inference_mode():
        for batch in (1, 7):
            x = inputs(batch, size)
            ref, got = model(x).logits, fn(x)
            assert got.shape == ref.shape
            worst = max(worst, float((got - ref).abs().max()))
    assert worst <= TOL
    return worst


# ----------------------------------------------------------------------------- from a run


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["state_dict", "exported", "onnx", "torchscript"])
def test_vit_run_export_parity(fmt: str, vit_run: Path, vit_student: torch.nn.Module,
                               tmp_path: Path) -> None:
    out = tmp_path / f"student{EXTENSIONS[fmt]}"
    result = export_run(vit_run, fmt, out)
    report = result.report
    assert result.passed and report["arch"] == STUDENT and report["input_size"] == SIZE
    assert report["test_images"] == N_TEST and report["top1_agreement"] == 100.0
    assert report["max_abs_logit_diff"] <= TOL
    assert json.loads(result.parity_path.read_text())["passed"]
    assert_parity(load_artefact(out, fmt), vit_student, SIZE)


@pytest.mark.e2e
def test_vit_latency(vit_run: Path, tmp_path: Path) -> None:
    settings = LatencySettings(batch_sizes=(1,), runs=3, warmup=1, threads=1,
                               runtimes=("eager", "onnxruntime"), allow_short=True)
    result = run_latency(vit_run, settings, out=tmp_path / "lat")
    rows = {(r["model"], r["runtime"]): r for r in result["rows"]}
    assert set(rows) == {(m, rt) for m in ("teacher", "student")
                         for rt in ("eager", "onnxruntime")}
    for key, row in rows.items():
        assert "error" not in row and 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"], key
    student = rows[("student", "eager")]
    assert student["arch"] == STUDENT
    model = create_model(STUDENT, num_classes=NUM_CLASSES)
    assert student["macs_per_image"] == vit_macs(model, SIZE)
    assert student["parameters"] == sum(p.numel() for p in model.parameters())
    assert {s["runtime"] for s in result["speedup"]} == {"eager", "onnxruntime"}


# ----------------------------------------------------------------------------- model level


def vit_macs(model: VisionTransformer, size: int) -> int:
    """MACs of one image counted by hand from the architecture: the patch convolution, per
    block the qkv, projection and two MLP linear layers on every token and the two attention
    products ``q k^T`` and ``attn v``, and the head."""
    dim = model.classifier.in_features
    grid = (size // model.patch_size) ** 2
    n = grid + model.embed.num_prefix
    hidden = model.blocks[0].mlp.fc1.out_features
    patch = model.in_channels * model.patch_size**2 * dim * grid
    block = n * dim * 3 * dim + n * dim * dim + 2 * n * dim * hidden + 2 * n * n * dim
    return patch + len(model.blocks) * block + dim * model.num_classes


@pytest.mark.parametrize(("arch", "size"), [
    ("vit_tiny", 32), ("vit_tiny", 16),
    pytest.param("vit_lite_7_gap", 32, marks=pytest.mark.e2e),  # building it takes ~1-2 s
])
def test_count_macs_includes_attention(arch: str, size: int) -> None:
    model = create_model(arch, num_classes=10)
    assert count_macs(model, (3, size, size)) == vit_macs(model, size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [32, 16])
def test_vit_torchscript_parity(size: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=10).eval()
    path = tmp_path / "vit.ts"
    save_torchscript(LogitsOnly(model), path, inputs(2, size, seed=5))
    assert assert_parity(load_artefact(path, "torchscript"), model, size) == 0.0


def test_vit_int8_is_refused_in_one_line() -> None:
    model = create_model("vit_tiny", num_classes=10).eval()
    x = inputs(2, 32)
    with pytest.raises(ExportError, match="^int8: FX cannot trace this model: ") as e:
        quantize_int8(model, [x], x)
    assert "\n" not in str(e.value)


@pytest.mark.e2e  # two exports of a 3.7M-parameter ViT: several seconds
@pytest.mark.parametrize(("arch", "size", "resizes"), [("vit_lite_7_gap", 32, 0),
                                                       ("vit_tiny", 16, 1)])
def test_vit_onnx_and_exported_parity(arch: str, size: int, resizes: int,
                                      tmp_path: Path) -> None:
    """Native size: no position-embedding resampling in the graph; another size: one bicubic
    ``Resize`` (ONNX opset >= 18 carries its antialiasing)."""
    import onnx

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10).eval()
    example = inputs(2, size, seed=5)
    batches = [(inputs(b, size, seed=9), torch.zeros(b, dtype=torch.long)) for b in (16, 5)]
    for fmt, save in (("onnx", save_onnx), ("exported", save_exported)):
        path = tmp_path / f"vit{EXTENSIONS[fmt]}"
        save(LogitsOnly(model), path, example)
        fn = load_artefact(path, fmt)
        figures = check_parity(LogitsOnly(model), fn, batches)
        assert figures["top1_agreement"] == 100.0 and figures["max_abs_logit_diff"] <= TOL
        assert_parity(fn, model, size)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "vit.onnx")).graph.node)
    assert ops["Resize"] == resizes
