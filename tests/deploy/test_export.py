"""`kdlab export`: every format round-trips (read back without kdlab, equal to the eager student
to 1e-5 at batch 1 and 7), holds the student alone, and writes a correct parity report; int8
runs and reports its accuracy change; user errors are one line and a non-zero exit."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdlab.cli.main import main
from kdlab.config import load_config
from kdlab.data.build import build_data
from support import one_error_line

N_TEST = 23
NUM_CLASSES = 4
SIZE = 16
EXT = {"state_dict": ".pt", "torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}


def inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


def reload(path: Path, fmt: str) -> Any:
    """The artefact read back with the plain torch / onnxruntime APIs (not kdlab's loader):
    a function images -> logits, and the names of the weight tensors it holds."""
    if fmt == "state_dict":
        from kdlab.models import create_model

        obj = torch.load(path, weights_only=True)
        model = create_model(obj["arch"], num_classes=obj["num_classes"],
                             in_channels=obj["in_channels"]).eval()
        model.load_state_dict(obj["model"])
        return (lambda x: model(x).logits), set(obj["model"])
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
        return module, {k.removeprefix("model.") for k in module.state_dict()}
    if fmt == "exported":
        program = torch.export.load(str(path))
        return program.module(), {k.removeprefix("model.") for k in program.state_dict}
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic (dynamic) batch
    return ((lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])),
            {t.name for t in proto.graph.initializer}, proto)


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "exported", "onnx"])
def test_round_trip(fmt: str, tiny_run: Path, student: torch.nn.Module, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"student{EXT[fmt]}"
    assert main(["-q", "export", str(tiny_run), "--format", fmt, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    fn, names, *rest = reload(out, fmt)
    with torch.inference_mode():
        for batch in (1, 7):  # the dynamic batch dimension
            x = inputs(batch)
            ref = student(x).logits
            got = fn(x)
            assert got.shape == (batch, NUM_CLASSES)
            assert torch.allclose(got, ref, rtol=0, atol=1e-5), (got - ref).abs().max()

    # the student alone: exactly its tensors (no teacher, no CRD embeddings or memory)
    own = student.state_dict()
    if fmt == "onnx":  # the exporter folds BatchNorm into the convolutions
        elements = sum(math.prod(t.dims) for t in rest[0].graph.initializer)
        weights = sum(p.numel() for n, p in student.named_parameters()
                      if n.endswith("weight") and p.dim() > 1)
        assert weights <= elements <= sum(t.numel() for t in own.values())
        assert not any("teacher" in n or "distiller" in n or "embed" in n for n in names)
    else:
        assert names == set(own)

    report = json.loads(out.with_name(out.name + ".parity.json").read_text())
    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    assert report["format"] == fmt and report["precision"] == "fp32" and report["passed"]
    assert report["test_images"] == N_TEST
    assert report["top1_agreement"] == 100.0
    assert 0.0 <= report["max_abs_logit_diff"] <= 1e-5
    # the trainer evaluated the same weights on the same test set
    assert report["top1_eager"] == pytest.approx(best["top1"])
    assert report["top1_exported"] == report["top1_eager"] and report["top1_change"] == 0.0
    assert report["student_parameters"] == sum(p.numel() for p in student.parameters())
    assert report["arch"] == "resnet8" and report["num_classes"] == NUM_CLASSES
    assert report["in_channels"] == 3 and report["input_size"] == SIZE
    assert report["dynamic_batch"] == (fmt != "state_dict")
    assert report["versions"]["torch"] == torch.__version__ and report["date"]
    assert report["machine"]["cpu_model"] and report["failures"] == []


@pytest.mark.e2e
def test_state_dict_default_path_and_kdlab_eval(tiny_run: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The default file is RUN/export/student.pt and `kdlab eval --checkpoint` reads it."""
    assert main(["-q", "export", str(tiny_run), "--format", "state_dict"]) == 0
    path = tiny_run / "export" / "student.pt"
    report = json.loads((tiny_run / "export" / "student.pt.parity.json").read_text())
    capsys.readouterr()
    assert main(["-q", "eval", str(tiny_run), "--checkpoint", str(path)]) == 0
    shown = capsys.readouterr().out
    assert f"top-1 {report['top1_eager']:.2f}" in shown, shown


@pytest.mark.e2e
def test_int8(tiny_run: Path, student: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "student.int8.ts"
    fp32 = tmp_path / "student.ts"
    assert main(["-q", "export", str(tiny_run), "--format", "torchscript", "--out", str(fp32)]) == 0
    assert main(["-q", "export", str(tiny_run), "--format", "torchscript", "--int8",
                 "--batches", "2", "--min-agreement", "0", "--out", str(out)]) == 0
    report = json.loads(out.with_name(out.name + ".parity.json").read_text())
    assert report["precision"] == "int8" and report["int8"]["calibration_batches"] == 2
    assert report["int8"]["calibration_images"] == 32 and report["int8"]["engine"] == "x86"
    assert report["top1_change"] == pytest.approx(report["top1_exported"] - report["top1_eager"])
    assert out.stat().st_size < 0.6 * fp32.stat().st_size  # int8 weights: ~1/4 of fp32

    # recompute the reported figures independently on the run's test set
    torch.backends.quantized.engine = "x86"
    qmodel = torch.jit.load(str(out))
    cfg = load_config(tiny_run / "config.yaml")
    data = build_data(cfg.data, seed=cfg.seed, device=torch.device("cpu"), channels_last=False)
    agree = hits = hits_ref = n = 0
    diff = 0.0
    with torch.inference_mode():
        for images, labels, _ in data.test_loader:
            q, ref = qmodel(images), student(images).logits
            assert q.dtype == torch.float32 and q.shape == ref.shape
            agree += int((q.argmax(1) == ref.argmax(1)).sum())
            hits += int((q.argmax(1) == labels).sum())
            hits_ref += int((ref.argmax(1) == labels).sum())
            diff = max(diff, float((q - ref).abs().max()))
            n += len(labels)
    assert n == report["test_images"] == N_TEST
    assert report["top1_agreement"] == pytest.approx(100 * agree / n)
    assert report["top1_exported"] == pytest.approx(100 * hits / n)
    assert report["top1_eager"] == pytest.approx(100 * hits_ref / n)
    assert report["max_abs_logit_diff"] == pytest.approx(diff)
    assert 0 < diff < 1.0  # quantised: close to, but not equal to, fp32


@pytest.mark.e2e
def test_int8_other_formats_refused(tiny_run: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.pt2"
    assert main(["-q", "export", str(tiny_run), "--format", "exported", "--int8",
                 "--out", str(out)]) == 2
    assert "--int8 supports --format torchscript or onnx only" in one_error_line(
        capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.e2e
def test_parity_failure_keeps_files(tiny_run: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A bound nothing can meet (max diff <= -1) fails: exit 4, one line, the files stay."""
    out = tmp_path / "student.pt2"
    assert main(["-q", "export", str(tiny_run), "--format", "exported", "--tolerance", "-1",
                 "--out", str(out)]) == 4
    line = one_error_line(capsys.readouterr().err)
    assert "parity check" in line and "max |logit diff| 0 > -1" in line
    report = json.loads(out.with_name(out.name + ".parity.json").read_text())
    assert out.is_file() and report["passed"] is False and len(report["failures"]) == 1
    assert "--batches" not in line  # the int8 knobs are for int8 artefacts only


@pytest.mark.e2e
def test_int8_parity_failure_names_the_knobs(tiny_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "student.int8.ts"
    assert main(["-q", "export", str(tiny_run), "--format", "torchscript", "--int8",
                 "--batches", "1", "--min-agreement", "101", "--out", str(out)]) == 4
    line = one_error_line(capsys.readouterr().err)
    assert "top-1 agreement" in line and "< 101%" in line
    assert "--batches N" in line and "drop --int8" in line and "fine-tune" in line


@pytest.mark.e2e
def test_errors(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # unknown format
    assert main(["export", str(tiny_run), "--format", "tflite"]) == 2
    assert "unknown format 'tflite'" in one_error_line(capsys.readouterr().err)
    # not a run directory
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 2
    assert "not a kdlab run directory" in one_error_line(capsys.readouterr().err)
    # a run without best.pt
    empty = tmp_path / "no_best"
    empty.mkdir()
    shutil.copy(tiny_run / "config.yaml", empty / "config.yaml")
    assert main(["export", str(empty), "--format", "state_dict"]) == 2
    assert "has no best.pt" in one_error_line(capsys.readouterr().err)
    # a corrupt best.pt: truncated, then one flipped byte (fails the stored sha256)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_run, bad, ignore=shutil.ignore_patterns("export", "latency"))
    best = bad / "checkpoints" / "best.pt"
    raw = best.read_bytes()
    best.write_bytes(raw[: len(raw) // 2])
    assert main(["export", str(bad), "--format", "torchscript"]) == 2
    assert "cannot read checkpoint" in one_error_line(capsys.readouterr().err)
    obj = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    obj["model"]["fc.bias"] = obj["model"]["fc.bias"] + 1.0  # changed after it was written
    torch.save(obj, best)
    assert main(["export", str(bad), "--format", "torchscript"]) == 2
    assert "sha256" in one_error_line(capsys.readouterr().err)
    assert not (bad / "export").exists()


@pytest.mark.e2e
def test_missing_onnx_packages(tiny_run: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    out = tmp_path / "s.onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "onnxscript" in line and "pip install -e '.[export]' in the kdlab clone" in line
    assert not out.exists()


def test_parity_counts_disagreement_and_nan() -> None:
    """check_parity on hand-made logits: 1 of 4 argmaxes differs; a NaN logit poisons the
    max difference (so a tolerance check fails)."""
    from kdlab.deploy.export import check_parity

    ref = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    cand = ref.clone()
    cand[1] = torch.tensor([1.5, 1.0])  # flips image 1 (diff 1.5)
    labels = torch.tensor([0, 1, 1, 0])
    batches = [(torch.arange(4.0)[:2].view(2, 1), labels[:2]),
               (torch.arange(4.0)[2:].view(2, 1), labels[2:])]

    def by_index(table: torch.Tensor):
        return lambda x: table[x.view(-1).long()]

    r = check_parity(by_index(ref), by_index(cand), batches)
    assert r["test_images"] == 4 and r["top1_agreement"] == 75.0
    assert r["max_abs_logit_diff"] == pytest.approx(1.5)
    assert r["top1_eager"] == 50.0 and r["top1_exported"] == 25.0 and r["top1_change"] == -25.0
    cand[3, 0] = float("nan")
    r = check_parity(by_index(ref), by_index(cand), batches)
    assert np.isnan(r["max_abs_logit_diff"])


@pytest.mark.e2e  # torch.export of MobileNetV2: several seconds
def test_deployable_mobilenetv2_exports(tmp_path: Path) -> None:
    """MobileNetV2's head lives at ``classifier.0`` behind the ``classifier`` property; the
    deployable copy lets torch.export walk it, with the same weights and the same logits."""
    from kdlab.deploy.export import LogitsOnly, deployable
    from kdlab.models import create_model

    torch.manual_seed(0)
    model = create_model("MobileNetV2", num_classes=NUM_CLASSES).eval()
    twin = deployable(model)
    assert twin is not model and twin.state_dict().keys() == model.state_dict().keys()
    assert twin.classifier is twin._modules["classifier"]  # the container, not the Linear
    assert isinstance(model.classifier, torch.nn.Linear)  # the original is untouched
    program = torch.export.export(LogitsOnly(twin), (inputs(2),),
                                  dynamic_shapes={"images": {0: torch.export.Dim("b", min=1)}})
    with torch.inference_mode():
        for batch in (1, 7):
            x = inputs(batch)
            assert torch.equal(program.module()(x), model(x).logits)
    other = create_model("resnet8", num_classes=NUM_CLASSES)
    assert deployable(other) is other
