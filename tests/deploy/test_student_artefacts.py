"""The input description travels everywhere: the run, best.pt, every export format, the hub
folder (safetensors + JSON, no pickle), ONNX with the preprocessing inside; `kdlab predict`
gives the same answer from each of them."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdlab
from kdlab.cli.main import main
from kdlab.core.errors import CheckpointError
from kdlab.data.input_spec import InputSpec
from kdlab.deploy.predict import open_predictor, predict_files, read_metadata
from kdlab.runs.open import open_run
from support import one_error_line

NUM_CLASSES = 4
N_IMAGES = 5


@pytest.fixture(scope="module")
def test_images(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The first test images of the run saved as PNG files, and the run's test batch."""
    folder = tmp_path_factory.mktemp("images")
    loader = open_run(tiny_run).data().test_loader
    loader.set_epoch(0)
    batch = next(iter(loader))
    for i in range(N_IMAGES):
        pixels = loader.dataset.images[i].permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder, batch


@pytest.fixture(scope="module")
def artefacts(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("artefacts")
    paths = {"state_dict": out / "s.pt", "torchscript": out / "s.ts", "exported": out / "s.pt2",
             "onnx": out / "s.onnx"}
    for fmt, path in paths.items():
        assert main(["-q", "export", str(tiny_run), "--format", fmt, "--out", str(path)]) == 0
    paths["hub"] = out / "hub"
    assert main(["-q", "export", str(tiny_run), "--format", "hub", "--out",
                 str(paths["hub"])]) == 0
    paths["pre"] = out / "pre.onnx"
    assert main(["-q", "export", str(tiny_run), "--format", "onnx", "--include-preprocessing",
                 "--probabilities", "--out", str(paths["pre"])]) == 0
    return paths


def test_the_run_records_its_input(tiny_run: Path, test_images: tuple[Path, object]) -> None:
    recorded = json.loads((tiny_run / "input.json").read_text())
    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    assert best["input"] == recorded
    spec = InputSpec.from_dict(recorded)
    assert spec.classes == tuple(f"class_{i}" for i in range(NUM_CLASSES))
    assert spec.dataset == "synthetic" and spec.size == 16
    student = kdlab.load_student(tiny_run)
    assert student.kdlab_meta["classes"] == list(spec.classes)
    folder, batch = test_images
    for i in range(N_IMAGES):  # the PNG file gives exactly the test loader's tensor
        assert torch.equal(student.preprocess(folder / f"img{i}.png"), batch.images[i])


@pytest.mark.e2e
def test_every_artefact_carries_it(tiny_run: Path, artefacts: dict[str, Path]) -> None:
    expected = json.loads((tiny_run / "input.json").read_text())
    for fmt in ("torchscript", "exported", "onnx"):
        meta = read_metadata(artefacts[fmt], fmt)
        assert meta["input_spec"] == expected, fmt
        assert meta["classes"] == expected["classes"], fmt
    assert torch.load(artefacts["state_dict"], weights_only=True)["input_spec"] == expected
    config = json.loads((artefacts["hub"] / "config.json").read_text())
    assert config["input_spec"] == expected and config["classes"] == expected["classes"]
    for name in ("s.pt.parity.json", "pre.onnx.parity.json"):
        parity = json.loads((artefacts["state_dict"].parent / name).read_text())
        assert parity["input"]["name"] == "images" and parity["passed"]


@pytest.mark.e2e
def test_hub_folder(tiny_run: Path, artefacts: dict[str, Path], tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    hub = artefacts["hub"]
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    raw = (hub / "model.safetensors").read_bytes()  # safetensors: u64 header size, JSON header
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert "model.fc.weight" in header or any(k.endswith(".weight") for k in header)
    config = json.loads((hub / "config.json").read_text())
    assert config["kind"] == "kdlab-hub" and config["arch"] == "resnet8"
    assert config["teacher"]["arch"] == "resnet14" and config["method"] == "kd+crd"
    assert config["parity"]["passed"] and config["parity"]["max_abs_logit_diff"] == 0
    assert [r["seed"] for r in config["seeds"]] == [0]
    assert config["latency"]["median_ms"] > 0
    card = (hub / "README.md").read_text()
    for heading in ("## Use", "## Input", "## Results", "## Parity and latency",
                    "## Intended use"):
        assert heading in card
    # read back without the run and without pickle: equal to the run's own student
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loaded = kdlab.load_student(hub)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, kdlab.load_student(tiny_run)(x).logits)
    # a changed weights file is refused by its sha256
    bad = tmp_path / "bad"
    shutil.copytree(hub, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed since it was exported"):
        kdlab.load_student(bad)
    # exporting over something that is not a hub folder is refused, over a hub folder replaces
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_run), "--format", "hub", "--out", str(other)]) == 2
    assert "not a kdlab hub folder" in one_error_line(capsys.readouterr().err)
    assert (other / "keep.txt").read_text() == "mine"


@pytest.mark.e2e
def test_onnx_with_preprocessing(tiny_run: Path, artefacts: dict[str, Path]) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(artefacts["pre"]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert session.get_outputs()[0].name == "probabilities"
    run = open_run(tiny_run)
    ds = run.data().test_loader.dataset
    pixels = ds.images[:7].numpy()
    probs = torch.from_numpy(session.run(None, {"images": pixels})[0])
    student = kdlab.load_student(tiny_run)
    with torch.no_grad():
        expected = student(student.preprocess(ds.images[0])[None]).logits.softmax(1)
    assert torch.allclose(probs[:1], expected, atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(7), atol=1e-5)
    parity = json.loads(Path(str(artefacts["pre"]) + ".parity.json").read_text())
    assert parity["test_images"] == len(ds) and parity["top1_agreement"] == 100.0


@pytest.mark.e2e
def test_predict_agrees_across_sources(tiny_run: Path, artefacts: dict[str, Path],
                                       test_images: tuple[Path, object]) -> None:
    folder, _ = test_images
    images = sorted(folder.glob("*.png"))
    reference = predict_files(open_predictor(tiny_run), images, top_k=NUM_CLASSES)
    assert [t["class"] for t in reference[0]["top"]] != []
    for name, path in artefacts.items():
        rows = predict_files(open_predictor(path), images, top_k=NUM_CLASSES)
        for got, want in zip(rows, reference, strict=True):
            assert [t["index"] for t in got["top"]] == [t["index"] for t in want["top"]], name
            assert np.allclose([t["probability"] for t in got["top"]],
                               [t["probability"] for t in want["top"]], atol=1e-5), name


@pytest.mark.e2e
def test_predict_cli(tiny_run: Path, test_images: tuple[Path, object], tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = test_images
    out = tmp_path / "p.csv"
    assert main(["-q", "predict", str(tiny_run), str(folder), "--top-k", "2",
                 "--output-format", "csv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 2 * N_IMAGES and {r["rank"] for r in rows} == {"1", "2"}
    assert all(r["class"] in {f"class_{i}" for i in range(NUM_CLASSES)} for r in rows)
    assert main(["-q", "predict", str(tiny_run), str(folder / "img0.png"),
                 "--output-format", "json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert len(parsed) == 1 and abs(sum(t["probability"] for t in parsed[0]["top"]) - 1) < 1e-5
    # errors: one line, exit 2
    assert main(["predict", str(tiny_run), str(tmp_path / "missing.png")]) == 2
    assert "no such image file or folder" in one_error_line(capsys.readouterr().err)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(tiny_run), str(empty)]) == 2
    assert "no images found" in one_error_line(capsys.readouterr().err)
    (tmp_path / "broken.png").write_bytes(b"no png")
    assert main(["predict", str(tiny_run), str(tmp_path / "broken.png")]) == 2
    assert "not a readable image" in one_error_line(capsys.readouterr().err)
    assert main(["predict", str(tmp_path), str(folder)]) == 2
    assert "not a kdlab run directory" in one_error_line(capsys.readouterr().err)
