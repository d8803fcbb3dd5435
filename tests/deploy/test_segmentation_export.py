"""Segmentation deployment (:mod:`kdlab.deploy.segmentation`): ``kdlab export`` of a ``task:
segmentation`` run, and the per-class IoU of ``kdlab eval``.

The run: ResNet-8 with a DeepLabV3 head (8 ASPP channels) trained for one epoch (4 steps of 4
crops) on a tiny synthetic Fashion-MNIST segmentation set (16 train / 6 test canvases of 32 px,
11 classes), evaluated in batches of 4 and 2. References computed here, independently of the
code under test: the run's student rebuilt from ``best.pt`` (``build_segmenter`` + the weights),
its logits on the test images, and their mIoU from a NumPy confusion matrix.

Tolerances of the round trips (fp32, same machine): the state-dict file rebuilds the same module
(bit-identical logits); TorchScript, ``torch.export`` and ONNX (onnxruntime) run other kernels,
so logits agree to :data:`ROUND_TRIP_TOL` (measured: <= 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from kdlab.cli.main import main
from kdlab.config import SegmentationConfig
from kdlab.deploy import segmentation as sg
from kdlab.deploy.export import ExportError, ParityError, export_run
from kdlab.tasks.segmentation.data import SegmentationEvalBatch
from kdlab.tasks.segmentation.evaluation import format_class_iou, named_class_iou
from kdlab.tasks.segmentation.model import build_segmenter

SIDE = 32
N_TRAIN, N_TEST = 16, 6
ARCH = "resnet8"
SEGMENTATION = {"head": "deeplabv3", "atrous_rates": [1, 2, 3], "aspp_channels": 8,
                "crop_size": SIDE, "base_size": SIDE, "scale_range": [0.75, 1.25]}
#: the round-trip tolerance of the traced / exported / ONNX artefacts (module docstring).
ROUND_TRIP_TOL = 1e-4


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Every test on one intra-op thread (``one_thread``, tests/conftest.py)."""


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny segmentation run (module docstring)."""
    from kdlab.data.synthetic import write_idx
    from kdlab.tasks.segmentation.synthetic import make_fashion_mnist_segmentation

    root = tmp_path_factory.mktemp("seg_export")
    idx = write_idx(root / "idx", n_train=60, n_test=20, seed=0)
    make_fashion_mnist_segmentation(root / "data", fashion_mnist_root=idx, n_train=N_TRAIN,
                                    n_test=N_TEST, size=SIDE, objects=(1, 2), scale=(1, 1),
                                    seed=0)
    cfg = {"name": "seg", "task": "segmentation", "seed": 0,
           "data": {"name": "fm_segmentation", "root": str(root / "data"), "batch_size": 4,
                    "eval_batch_size": 4, "num_workers": 0},
           "segmentation": SEGMENTATION, "student": {"arch": ARCH},
           "optim": {"lr": 0.05, "epochs": 1, "scheduler": "cosine"},
           "runtime": {"threads": 1, "amp": "off", "channels_last": False, "device": "cpu"}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    assert main(["-q", "train", str(root / "cfg.yaml"), "--run-dir", str(root / "run"),
                 "--no-progress"]) == 0
    torch.set_num_threads(threads)
    return root / "run"


@pytest.fixture(scope="module")
def classes(seg_run: Path) -> list[str]:
    """The data set's class names as its generator wrote them."""
    return list(json.loads((seg_run.parent / "data" / "classes.json").read_text()))


@pytest.fixture(scope="module")
def student(seg_run: Path, classes: list[str]) -> torch.nn.Module:
    """The run's student rebuilt independently of kdlab.deploy: head + best.pt weights."""
    model = build_segmenter(ARCH, len(classes), SegmentationConfig(**SEGMENTATION))
    best = torch.load(seg_run / "checkpoints" / "best.pt", weights_only=True)
    model.load_state_dict(best["model"])
    return model.eval()


@pytest.fixture(scope="module")
def test_set(seg_run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised test images ``N x 3 x 32 x 32`` and their labels ``N x 32 x 32``."""
    run = sg.load_segmenter_run(seg_run)
    images, labels = [], []
    for batch in run.data.test_loader:
        images += batch.images
        labels += batch.labels
    return torch.stack(images), torch.stack(labels)


def _miou(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """mIoU (%) of argmax maps against labels by a NumPy confusion matrix (255 ignored;
    classes with an empty union left out)."""
    pred, lab = logits.argmax(1).numpy().ravel(), labels.numpy().ravel()
    keep = lab != 255
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (lab[keep], pred[keep]), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    return float(100 * np.mean(inter[union > 0] / union[union > 0]))


def _export(run: Path, fmt: str, tmp_path: Path, **kw: Any) -> Any:
    return sg.export_segmenter(run, fmt, tmp_path / f"student{sg.ex.EXTENSIONS[fmt]}", **kw)


# --------------------------------------------------------------------------- fast units
def test_named_class_iou_and_table() -> None:
    scores = {"mIoU": 50.0, "IoU_0": 80.0, "IoU_2": 20.0}
    named = named_class_iou(scores, ["background", "shirt", "bag", "bag"])
    assert named == {"background": 80.0, "shirt": None, "bag": 20.0, "bag (3)": None}
    table = format_class_iou(named).splitlines()
    assert table[0].split() == ["class", "IoU", "%"]
    assert table[1].split() == ["background", "80.00"] and table[2].split() == ["shirt", "-"]
    assert len({len(row) for row in table}) == 1  # aligned


def test_parity_counts_pixels_and_scores_both_maps() -> None:
    """A candidate that raises class 1 by 10 on the left half of every image: agreement,
    difference and both mIoUs against hand-counted values."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(2, 4, 6, generator=g) for _ in range(3)]
    labels = [torch.randint(0, 3, (4, 6), generator=g) for _ in range(3)]
    labels[0][0, 0] = 255

    def reference(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x[:, :1]], dim=1)  # 3 classes from 2 channels

    def candidate(x: torch.Tensor) -> torch.Tensor:
        out = reference(x).clone()
        out[:, 1, :, :3] += 10.0
        return out

    batches = [SegmentationEvalBatch(images[:2], labels[:2], [0, 1]),
               SegmentationEvalBatch(images[2:], labels[2:], [2])]
    fig = sg.check_segmenter_parity(reference, candidate, batches, SegmentationConfig(), 3,
                                    ["a", "b", "c"])
    ref = torch.stack([reference(x[None])[0] for x in images])
    got = torch.stack([candidate(x[None])[0] for x in images])
    lab = torch.stack(labels)
    assert fig["test_images"] == 3 and fig["pixels"] == 3 * 4 * 6
    assert fig["pixel_agreement"] == pytest.approx(
        100 * float((ref.argmax(1) == got.argmax(1)).float().mean()))
    assert fig["pixel_agreement"] < 100
    assert fig["pixels_differing"] == int((ref.argmax(1) != got.argmax(1)).sum())
    assert fig["max_abs_logit_diff"] == pytest.approx(10.0)
    assert fig["mIoU_eager"] == pytest.approx(_miou(ref, lab, 3))
    assert fig["mIoU_exported"] == pytest.approx(_miou(got, lab, 3))
    assert set(fig["per_class_iou_exported"]) == {"a", "b", "c"}


def test_probe_reports_an_artefact_that_cannot_take_another_size() -> None:
    def reference(x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] * 2

    def fixed(x: torch.Tensor) -> torch.Tensor:  # a graph specialised to 8 x 8 images
        if tuple(x.shape[-2:]) != (8, 8):
            raise RuntimeError("Guard failed: images.size()[2] == 8\nmore")
        return reference(x)

    example = torch.zeros(2, 3, 8, 8)
    probe = sg.probe_shapes(reference, fixed, example)
    assert probe["shape"] == [3, 3, 24, 16] and probe["error"].startswith("Guard failed")
    failures = sg._parity_failures({"pixel_agreement": 100.0, "max_abs_logit_diff": 0.0},
                                   probe, 1e-3, 99.9)
    assert len(failures) == 1 and "cannot run a [3, 3, 24, 16] probe batch" in failures[0]
    same = sg.probe_shapes(reference, fixed, example, grow=False)  # batch 3, same size
    assert same["max_abs_logit_diff"] == 0.0 and same["output_shape"] == [3, 2, 8, 8]


def test_refusals_name_the_formats_that_work(tmp_path: Path) -> None:
    """Refused before anything is read or written (the run folder need not exist)."""
    for fmt, kw, words in (("onnx", {"int8": True}, "--int8"), ("hub", {}, "--format hub"),
                           ("tflite", {}, "unknown format")):
        with pytest.raises(ExportError) as e:
            sg.export_segmenter(tmp_path / "run", fmt, **kw)
        msg = str(e.value)
        assert words in msg and "\n" not in msg
        assert "state_dict" in msg and "onnx" in msg
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- round trips
@pytest.mark.e2e
def test_state_dict_round_trip(seg_run: Path, tmp_path: Path, student: torch.nn.Module,
                               classes: list[str], test_set: Any) -> None:
    res = _export(seg_run, "state_dict", tmp_path)
    stored = torch.load(res.path, weights_only=True)
    best = torch.load(seg_run / "checkpoints" / "best.pt", weights_only=True)
    assert stored["task"] == "segmentation" and stored["classes"] == classes
    assert stored["segmentation"]["head"] == "deeplabv3"
    assert all(torch.equal(stored["model"][k], v) for k, v in best["model"].items())
    model = sg.read_segmenter(res.path)
    images, labels = test_set
    with torch.no_grad():
        want = student(images).logits
        assert torch.equal(model(images).logits, want)
    assert model.kdlab_meta["classes"] == classes
    r = json.loads(res.parity_path.read_text())
    assert r["passed"] and r["max_abs_logit_diff"] == 0.0 and r["pixel_agreement"] == 100.0
    assert r["test_images"] == N_TEST and r["pixels"] == N_TEST * SIDE * SIDE
    assert r["mIoU_eager"] == pytest.approx(_miou(want, labels, len(classes)))
    assert r["mIoU_exported"] == r["mIoU_eager"]
    assert list(r["per_class_iou_eager"]) == classes


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["torchscript", "exported", "onnx"])
def test_traced_round_trip_with_dynamic_batch_and_size(fmt: str, seg_run: Path, tmp_path: Path,
                                                       student: torch.nn.Module,
                                                       classes: list[str],
                                                       test_set: Any) -> None:
    res = _export(seg_run, fmt, tmp_path)
    r = json.loads(res.parity_path.read_text())
    images, labels = test_set
    with torch.no_grad():
        want = student(images).logits
    assert r["passed"] and r["failures"] == [] and r["pixel_agreement"] == 100.0
    assert r["max_abs_logit_diff"] <= ROUND_TRIP_TOL
    assert r["mIoU_eager"] == pytest.approx(_miou(want, labels, len(classes)))
    assert r["mIoU_exported"] == pytest.approx(r["mIoU_eager"])
    assert r["shape_probe"]["output_shape"] == [3, len(classes), SIDE + 16, SIDE + 8]
    assert r["classes"] == classes and r["dynamic_image_size"]
    run = sg.load_segmenter_artefact(res.path, fmt)
    for shape in ((1, 3, 40, 24), (5, 3, 17, 33)):  # other batch sizes, non-square, odd sides
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            got, ref = torch.as_tensor(run(x)), student(x).logits
        assert tuple(got.shape) == (shape[0], len(classes), *shape[2:])
        assert float((got - ref).abs().max()) <= ROUND_TRIP_TOL
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(res.path)).graph
        dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
        assert dims[0] and not dims[1] and dims[2] and dims[3]  # batch, height, width symbolic
        meta = {p.key: p.value for p in onnx.load(str(res.path)).metadata_props}
        assert json.loads(meta["kdlab"])["classes"] == classes


@pytest.mark.e2e
def test_static_size_fallback(seg_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                              ) -> None:
    """Where torch.export cannot keep the image size symbolic, the graph takes the example's
    size (any batch) and the report says so."""
    monkeypatch.setattr(sg, "image_dims", lambda module, example: None)
    res = _export(seg_run, "exported", tmp_path)
    r = json.loads(res.parity_path.read_text())
    assert r["passed"] and not r["dynamic_image_size"]
    assert r["input"]["min_height"] is None and r["shape_probe"]["shape"] == [3, 3, SIDE, SIDE]
    run = sg.load_segmenter_artefact(res.path, "exported")
    assert tuple(run(torch.zeros(1, 3, SIDE, SIDE)).shape) == (1, 11, SIDE, SIDE)
    with pytest.raises(Exception, match="Guard failed"):
        run(torch.zeros(1, 3, SIDE + 8, SIDE))


@pytest.mark.e2e
def test_parity_error_names_the_failed_bound(seg_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ParityError, match=r"pixel agreement 100\.0000% < 100\.1%") as e:
        _export(seg_run, "state_dict", tmp_path, min_agreement=100.1)
    assert e.value.exit_code == 4
    report = json.loads((tmp_path / "student.pt.parity.json").read_text())
    assert not report["passed"] and (tmp_path / "student.pt").is_file()  # files kept


# --------------------------------------------------------------------------- the CLI
@pytest.mark.e2e
def test_cli_export_and_eval_name_the_classes(seg_run: Path, tmp_path: Path, classes: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "student.pt"
    assert main(["-q", "export", str(seg_run), "--format", "state_dict", "--out", str(out)]) == 0
    assert "pixel agreement 100.0000% (0 of 6144 pixels differ)" in capsys.readouterr().out
    assert main(["-q", "export", str(seg_run), "--format", "hub"]) != 0
    assert "--format hub holds classifiers" in capsys.readouterr().err
    with pytest.raises(ExportError, match="segmentation run.*export_segmenter"):
        export_run(seg_run, "onnx")  # the classification entry point sends it here
    assert main(["-q", "eval", str(seg_run), "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "eval" / "scores.json").read_text())
    per_class, scores = record["per_class_iou"], record["scores"]
    assert list(per_class) == classes
    for k, name in enumerate(classes):  # the flat keys stay, and agree with the named ones
        assert per_class[name] == scores.get(f"IoU_{k}")
    named = [n for n in classes if per_class[n] is not None]
    assert named and all(f"{n}" in printed for n in named)
    assert f"{per_class[named[0]]:.2f}" in printed
    parity = json.loads(out.with_name("student.pt.parity.json").read_text())
    assert scores["mIoU"] == pytest.approx(parity["mIoU_eager"])
    # the exported file evaluates to the same scores
    assert main(["-q", "eval", str(seg_run), "--checkpoint", str(out), "--out",
                 str(tmp_path / "eval_file")]) == 0
    again = json.loads((tmp_path / "eval_file" / "scores.json").read_text())
    assert again["scores"] == scores and again["per_class_iou"] == per_class
