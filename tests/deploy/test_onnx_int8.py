"""`kdlab export --format onnx --int8`: onnxruntime's static quantisation in the QDQ format,
calibrated on clean training images (the training split through the evaluation transform);
its parity report, its refusals and failure message, its latency row; and the clean
calibration images of both int8 paths checked against independently computed tensors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.cli.main import main
from kdlab.config import load_config, validate_config
from kdlab.core.errors import KdlabError
from kdlab.data.build import build_data, clean_train_loader
from kdlab.data.stream import read_image
from kdlab.data.transforms import imagenet_eval_transform
from kdlab.deploy import export as ex
from kdlab.deploy import onnx_int8 as oi
from support import one_error_line

N_TEST = 23
CPU = torch.device("cpu")
SHORT = ["--runs", "3", "--warmup", "1", "--allow-short", "--threads", "1"]


def run_data(run: Path) -> Any:
    """The run's data built from its config alone (not through kdlab.deploy)."""
    cfg = load_config(run / "config.yaml")
    return cfg, build_data(cfg.data, seed=cfg.seed, device=CPU, channels_last=False)


def clean_images(ds: Any) -> torch.Tensor:
    """Every image of a resident split through the evaluation transform, computed here:
    ``(pixel / 255 - mean) / std`` in float64, no crop, no flip."""
    mean = torch.tensor(ds.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float64).view(1, -1, 1, 1)
    return (ds.images.double() / 255.0 - mean) / std


def match_rows(batch: torch.Tensor, pool: torch.Tensor) -> tuple[list[int], float]:
    """For each image of ``batch``: the index of the closest image of ``pool`` and the largest
    of those closest distances (max |difference| over pixels)."""
    d = (batch.double()[:, None] - pool[None]).abs().flatten(2).amax(2)
    best = d.min(1)
    return best.indices.tolist(), float(best.values.max())


# --------------------------------------------------------------------------- fast unit tests
def test_reader_feeds_float32_batches_once() -> None:
    from onnxruntime.quantization import CalibrationDataReader

    batches = [torch.arange(24.0).view(2, 3, 2, 2), torch.ones(1, 3, 2, 2, dtype=torch.float64)]
    reader = oi.CleanImageReader(iter(batches), "images")
    assert isinstance(reader, CalibrationDataReader)
    feeds = list(reader)
    assert [list(f) for f in feeds] == [["images"], ["images"]]
    assert feeds[0]["images"].dtype == np.float32 and feeds[1]["images"].dtype == np.float32
    assert feeds[0]["images"].flags.c_contiguous
    np.testing.assert_array_equal(feeds[0]["images"], batches[0].numpy())
    np.testing.assert_array_equal(reader.first_batch, batches[0].numpy())
    assert (reader.batches_read, reader.images_read) == (2, 3)
    assert reader.get_next() is None and reader.get_next() is None


def test_settings_and_knobs() -> None:
    with pytest.raises(oi.OnnxInt8Error, match="unknown calibration method 'kl'"):
        oi.OnnxInt8Settings(calibration_method="kl")
    with pytest.raises(oi.OnnxInt8Error, match="QUInt8 or QInt8"):
        oi.OnnxInt8Settings(weight_type="QInt4")
    s = oi.OnnxInt8Settings()
    assert (s.calibration_method, s.per_channel, s.preprocess) == (
        oi.DEFAULT_CALIBRATION_METHOD, oi.DEFAULT_PER_CHANNEL, oi.DEFAULT_PREPROCESS)
    assert (s.activation_type, s.weight_type, s.reduce_range) == ("QUInt8", "QInt8", False)
    assert set(ex.INT8_KNOBS) == set(ex.INT8_FORMATS) == {"torchscript", "onnx"}
    onnx_knobs = ex.INT8_KNOBS["onnx"]
    assert "--batches N" in onnx_knobs and "calibration method" in onnx_knobs
    assert "--per-tensor" in onnx_knobs and "drop --int8" in onnx_knobs
    assert "export ONNX" not in onnx_knobs  # the TorchScript advice makes no sense here


def test_clean_train_loader_resident() -> None:
    """Same images and order as the training loader's epoch 0, without its crops and flips."""
    cfg = validate_config({"data": {"name": "synthetic", "batch_size": 16,
                                    "synthetic": {"n_train": 64, "n_test": 8, "size": 16,
                                                  "num_classes": 4}},
                           "student": {"arch": "resnet8"}}).data
    bundle = build_data(cfg, seed=3, device=CPU, channels_last=False)
    loader = clean_train_loader(bundle)
    assert len(loader) == 4 and loader.batch_size == 16
    batches = list(loader)
    index = torch.cat([b.index for b in batches])
    assert sorted(index.tolist()) == list(range(64))  # every training image once
    assert index.tolist() != list(range(64))  # a shuffled order
    bundle.train_loader.set_epoch(0)
    train_first = next(iter(bundle.train_loader))
    assert torch.equal(batches[0].index, train_first.index)  # the training order of epoch 0
    pool = clean_images(bundle.train_loader.dataset)
    found, dist = match_rows(batches[0].images, pool)
    assert found == batches[0].index.tolist() and dist < 1e-5
    torch.testing.assert_close(batches[0].labels, train_first.labels)
    _, aug_dist = match_rows(train_first.images, pool)
    assert aug_dist > 0.1  # the training batch is augmented: the check can tell them apart
    assert list(clean_train_loader(bundle, batch_size=5))[0].images.shape[0] == 5


def test_clean_train_loader_streamed(tmp_path: Path) -> None:
    """A class-folder dataset: the training files through the test transform (resize, centre
    crop), in the training sampler's epoch-0 order."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split in ("train", "val"):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for k in range(4):
                arr = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / f"c{c}" / f"{k}.png")
    cfg = validate_config({"data": {"name": "folder", "root": str(root), "num_workers": 0,
                                    "image_size": 16, "resize": 20, "batch_size": 4,
                                    "eval_batch_size": 4},
                           "student": {"arch": "resnet8"}}).data
    bundle = build_data(cfg, seed=0, device=CPU)
    loader = clean_train_loader(bundle)
    batches = list(loader)
    index = torch.cat([b.index for b in batches]).tolist()
    assert sorted(index) == list(range(12)) and index != list(range(12))
    bundle.train_loader.set_epoch(0)
    assert [int(i) for i in next(iter(bundle.train_loader)).index] == index[:4]
    paths = bundle.train_loader.dataset.index.paths
    transform = imagenet_eval_transform(20, 16, normalize=False)
    raw = torch.stack([transform(read_image(paths[i]), np.random.default_rng(0)) for i in index])
    mean = torch.tensor(loader.dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(loader.dataset.std).view(1, -1, 1, 1)
    images = torch.cat([b.images for b in batches])
    torch.testing.assert_close(images, (raw.float() / 255.0 - mean) / std, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_onnx_int8_export(tiny_run: Path, student: torch.nn.Module, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    out = tmp_path / "student.int8.onnx"
    fp32 = tmp_path / "student.onnx"
    assert main(["-q", "export", str(tiny_run), "--format", "onnx", "--out", str(fp32)]) == 0
    assert main(["-q", "export", str(tiny_run), "--format", "onnx", "--int8", "--batches", "2",
                 "--min-agreement", "0", "--out", str(out)]) == 0
    # the graph: QDQ pairs around float ops, int8 weights stored as such
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert convs and all(producers.get(n.input[0]) == "DequantizeLinear"
                         and producers.get(n.input[1], "initializer") in ("DequantizeLinear",)
                         for n in convs)
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= len(convs)
    assert out.stat().st_size < 0.6 * fp32.stat().st_size
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[ex.METADATA_KEY])["precision"] == "int8"

    report = json.loads(out.with_name(out.name + ".parity.json").read_text())
    assert report["format"] == "onnx" and report["precision"] == "int8"
    assert report["passed"] is True and report["min_agreement"] == 0
    q = report["int8"]
    assert q["api"] == "onnxruntime.quantization.quantize_static"
    assert q["quant_format"] == "QDQ"
    assert (q["activation_type"], q["weight_type"]) == ("QUInt8", "QInt8")
    assert q["per_channel"] is oi.DEFAULT_PER_CHANNEL and q["reduce_range"] is False
    assert q["calibration_method"] == oi.CALIBRATION_METHODS[oi.DEFAULT_CALIBRATION_METHOD]
    assert q["preprocess"] == "onnxruntime.quantization.shape_inference.quant_pre_process"
    assert q["calibration_batches"] == 2 and q["calibration_images"] == 32  # 2 x batch 16
    assert q["calibration_data"] == "clean training images (evaluation transform)"
    assert q["qdq_nodes"]["QuantizeLinear"] == ops.count("QuantizeLinear")
    assert q["onnxruntime"] == ort.__version__
    assert "VNNI" in q["types_reason"] and q["defaults_reason"].startswith("measured on")
    assert report["top1_change"] == pytest.approx(report["top1_exported"] - report["top1_eager"])

    # recompute the figures in a plain onnxruntime session, at the batch sizes of the test set
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch kept
    _, data = run_data(tiny_run)
    agree = hits = hits_ref = n = 0
    diff = 0.0
    with torch.inference_mode():
        for images, labels, _ in data.test_loader:
            got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
            ref = student(images).logits
            assert got.dtype == torch.float32 and got.shape == ref.shape
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
            hits += int((got.argmax(1) == labels).sum())
            hits_ref += int((ref.argmax(1) == labels).sum())
            diff = max(diff, float((got - ref).abs().max()))
            n += len(labels)
    assert n == report["test_images"] == N_TEST
    assert report["top1_agreement"] == pytest.approx(100 * agree / n)
    assert report["top1_exported"] == pytest.approx(100 * hits / n)
    assert report["top1_eager"] == pytest.approx(100 * hits_ref / n)
    assert report["max_abs_logit_diff"] == pytest.approx(diff, rel=1e-5)
    assert 0 < diff < 1.0  # quantised: close to, but not equal to, fp32


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_calibration_uses_clean_training_images(fmt: str, tiny_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The first calibration batch is the first training batch of epoch 0's order through the
    evaluation transform, computed here from the raw images; not the augmented batch."""
    seen: list[torch.Tensor] = []
    if fmt == "onnx":
        class Spy(oi.CleanImageReader):
            def get_next(self) -> Any:
                feed = super().get_next()
                if feed is not None:
                    seen.append(torch.from_numpy(feed[self.input_name]))
                return feed

        monkeypatch.setattr(oi, "CleanImageReader", Spy)
    else:
        real = ex.quantize_int8

        def spy(model: Any, calibration: Any, example: Any) -> Any:
            calibration = list(calibration)
            seen.extend(calibration)
            return real(model, calibration, example)

        monkeypatch.setattr(ex, "quantize_int8", spy)
    out = tmp_path / f"student.int8{'.onnx' if fmt == 'onnx' else '.ts'}"
    assert main(["-q", "export", str(tiny_run), "--format", fmt, "--int8", "--batches", "3",
                 "--min-agreement", "0", "--out", str(out)]) == 0
    report = json.loads(out.with_name(out.name + ".parity.json").read_text())
    assert report["int8"]["calibration_data"] == oi.CALIBRATION_DATA
    assert report["int8"]["calibration_images"] == 48
    assert len(seen) == 3 and all(b.shape == (16, 3, 16, 16) for b in seen)

    _, data = run_data(tiny_run)
    train = data.train_loader
    train.set_epoch(0)
    first = next(iter(train))
    pool = clean_images(train.dataset)
    found, dist = match_rows(seen[0], pool)
    assert dist < 1e-5  # every calibration image is an un-augmented training image
    assert found == first.index.tolist()  # the first images of the seeded training order
    found_all, _ = match_rows(torch.cat(seen), pool)
    assert len(set(found_all)) == 48  # 48 distinct images
    _, aug_dist = match_rows(first.images, pool)
    assert aug_dist > 0.1  # the augmented training batch would not pass the check above


@pytest.mark.e2e
def test_onnx_int8_parity_failure_names_the_knobs(tiny_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "student.int8.onnx"
    assert main(["-q", "export", str(tiny_run), "--format", "onnx", "--int8", "--batches", "1",
                 "--min-agreement", "101", "--out", str(out)]) == 4
    line = one_error_line(capsys.readouterr().err)
    assert "top-1 agreement" in line and "< 101%" in line
    assert "--batches N" in line and "--calibration-method" in line and "--per-tensor" in line
    assert "drop --int8" in line and "export ONNX and run it in fp32" not in line
    report = json.loads(out.with_name(out.name + ".parity.json").read_text())
    assert out.is_file() and report["passed"] is False
    assert report["int8"]["calibration_images"] == 16


@pytest.mark.e2e
def test_int8_refusals(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    for fmt in ("exported", "state_dict"):
        out = tmp_path / f"x.{fmt}"
        assert main(["-q", "export", str(tiny_run), "--format", fmt, "--int8",
                     "--out", str(out)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "--int8 supports --format torchscript or onnx only" in line and fmt in line
        assert not out.exists()
    out = tmp_path / "s.int8.onnx"
    assert main(["-q", "export", str(tiny_run), "--format", "onnx", "--int8", "--batches", "0",
                 "--out", str(out)]) == 2
    assert "--batches must be >= 1, got 0" in one_error_line(capsys.readouterr().err)
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import -> ImportError
    assert main(["-q", "export", str(tiny_run), "--format", "onnx", "--int8",
                 "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "int8 ONNX needs the onnxruntime.quantization package" in line
    assert "pip install -e '.[export]' in the kdlab clone" in line
    assert not out.exists()
    # the Python API refuses an unknown calibration method in one line, before writing
    with pytest.raises(KdlabError, match="unknown calibration method 'kl'"):
        ex.export_run(tiny_run, "onnx", out, int8=True,
                      onnx_int8=oi.OnnxInt8Settings(calibration_method="kl"))
    assert not out.exists()


@pytest.mark.e2e
def test_settings_reach_quantize_static(tiny_run: Path, tmp_path: Path) -> None:
    """Per-tensor weights and percentile calibration through the Python API: recorded, and the
    weight scales are scalars (per-channel ones are vectors)."""
    import onnx
    from onnx import numpy_helper

    def weight_scale_sizes(path: Path) -> set[int]:
        proto = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        return {int(inits[n.input[1]].size) for n in proto.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4}

    tensor = ex.export_run(tiny_run, "onnx", tmp_path / "t.onnx", int8=True,
                           calibration_batches=1, min_agreement=0,
                           onnx_int8=oi.OnnxInt8Settings(calibration_method="percentile",
                                                         per_channel=False, preprocess=False))
    q = tensor.report["int8"]
    assert (q["calibration_method"], q["per_channel"], q["preprocess"]) == (
        "Percentile", False, None)
    assert weight_scale_sizes(tensor.path) == {1}
    assert q["defaults_reason"].startswith("not the default")
    channel = ex.export_run(tiny_run, "onnx", tmp_path / "c.onnx", int8=True,
                            calibration_batches=1, min_agreement=0,
                            onnx_int8=oi.OnnxInt8Settings(per_channel=True))
    assert max(weight_scale_sizes(channel.path)) > 1


@pytest.mark.e2e
def test_latency_row(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lat"
    assert main(["-q", "latency", str(tiny_run), *SHORT, "--batch-sizes", "2",
                 "--runtimes", "onnxruntime", "onnxruntime_int8", "--out", str(out)]) == 0
    result = json.loads((out / "latency.json").read_text())
    rows = {(r["model"], r["runtime"]): r for r in result["rows"]}
    assert set(rows) == {(m, rt) for m in ("teacher", "student")
                         for rt in ("onnxruntime", "onnxruntime_int8")}
    for (_, rt), r in rows.items():
        assert "error" not in r, r
        assert r["precision"] == ("int8" if rt == "onnxruntime_int8" else "fp32")
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"]
    for m in ("teacher", "student"):  # the int8 file is the smaller one
        assert rows[(m, "onnxruntime_int8")]["artefact_mb"] < rows[(m, "onnxruntime")][
            "artefact_mb"]
    md = (out / "latency.md").read_text()
    assert "| onnxruntime_int8 | 2 |" in md
