"""Detection deployment (:mod:`kdlab.deploy.detection`): ``kdlab export`` and ``kdlab latency``
on a ``task: detection`` run.

The run: a MobileNetV2 FPN Faster R-CNN trained for 3 epochs (``kdlab train``) on a tiny
COCO-format set of 64 px images with coloured rectangles (8 train, 3 test images, 3 categories
with the non-contiguous COCO ids 1, 2, 5), so its test AP is above zero and a broken artefact
visibly changes it. References computed here, independently of the code under test: the run's
``best.pt`` weights, the eager detector's own detections (``Detector([image])``), and the COCO
metrics of those detections (:func:`kdlab.tasks.detection.evaluation.coco_metrics`).

Tolerances of the round trips (fp32, same machine): the state-dict file rebuilds the same
module, so its detections are bit-identical; TorchScript (traced or scripted) and ONNX
(onnxruntime) run other kernels, so boxes agree to 1e-3 px and scores to 1e-5, with the same
labels and counts (measured: ~1e-5 px and ~1e-7).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from kdlab.cli.main import main
from kdlab.core.io import file_sha256
from kdlab.deploy import detection as det
from kdlab.deploy.export import ExportError, ParityError, export_run
from kdlab.deploy.latency import LatencyError, LatencySettings
from support import box_canvases

SIDE = 64
CATEGORY_IDS = (1, 2, 5)
N_TRAIN, N_TEST = 8, 3
ARCH = "MobileNetV2_imagenet"
DETECTION = {"train_split": "train", "test_split": "test", "min_size": SIDE, "max_size": SIDE,
             "fpn_channels": 16, "anchor_sizes": [8, 16, 32, 64, 128],
             "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 100,
             "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 50,
             "box_batch_size_per_image": 16, "representation_size": 32}
#: the round-trip tolerances of the traced / scripted / ONNX artefacts (module docstring).
BOX_TOL, SCORE_TOL = 1e-3, 1e-5


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Every test on one intra-op thread (``one_thread``, tests/conftest.py)."""


@pytest.fixture(scope="module")
def det_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny detection run (module docstring)."""
    from kdlab.tasks.detection.coco import write_coco_split

    root = tmp_path_factory.mktemp("det_export")
    rng = np.random.default_rng(0)
    cats = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        write_coco_split(root / "data", split,
                         box_canvases(rng, n, split[:2], SIDE, CATEGORY_IDS), cats)
    cfg = {"name": "det", "task": "detection", "seed": 0,
           "data": {"name": "coco", "root": str(root / "data"), "batch_size": 4,
                    "eval_batch_size": 2, "num_workers": 0},
           "detection": DETECTION, "student": {"arch": ARCH}, "method": {"name": "vanilla"},
           "optim": {"epochs": 3, "lr": 0.02, "milestones": [], "weight_decay": 0.0001},
           "runtime": {"threads": 1, "amp": "off", "channels_last": False,
                       "deterministic": True}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    assert main(["-q", "train", str(root / "cfg.yaml"), "--run-dir", str(root / "run"),
                 "--no-progress"]) == 0
    torch.set_num_threads(threads)
    return root / "run"


@pytest.fixture(scope="module")
def eager(det_run: Path) -> Any:
    """The run's detector rebuilt by the task from best.pt (not through kdlab.deploy)."""
    import kdlab

    return kdlab.load_student(det_run).eval()


@pytest.fixture(scope="module")
def test_images(det_run: Path) -> list[torch.Tensor]:
    """The test images as the loader gives them (float [0, 1], CHW), plus two of other sizes
    (the artefacts take any size)."""
    from kdlab.tasks.detection.coco import CocoDetection

    ds = CocoDetection.from_split(det_run.parent / "data", "test")
    images = [ds[i].image.float() / 255 for i in range(len(ds))]
    wide = torch.nn.functional.interpolate(images[0][None], size=(48, 96), mode="bilinear")[0]
    return [*images, wide, images[1][:, 8:, :40].contiguous()]


def _same_detections(got: list[dict[str, torch.Tensor]], ref: list[dict[str, torch.Tensor]],
                     exact: bool) -> None:
    assert len(got) == len(ref)
    assert sum(len(r["boxes"]) for r in ref) > 0
    for g, r in zip(got, ref, strict=True):
        assert set(g) >= {"boxes", "scores", "labels"}
        assert g["boxes"].shape == r["boxes"].shape
        assert torch.equal(g["labels"].long(), r["labels"])
        if exact:
            assert torch.equal(g["boxes"], r["boxes"]) and torch.equal(g["scores"], r["scores"])
        else:
            assert torch.allclose(g["boxes"], r["boxes"], rtol=0, atol=BOX_TOL)
            assert torch.allclose(g["scores"], r["scores"], rtol=0, atol=SCORE_TOL)


def _check_report(path: Path, fmt: str) -> dict[str, Any]:
    """The parity report beside ``path``: the required keys, the file's size and hash, a
    pass."""
    report = json.loads(path.with_name(path.name + ".parity.json").read_text())
    assert report["kind"] == "kdlab-export-parity" and report["task"] == "detection"
    assert report["format"] == fmt and report["file"] == path.name
    assert report["size_bytes"] == path.stat().st_size
    assert report["sha256"] == file_sha256(path)
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["torchvision"]
    assert report["machine"]["cpu_model"] and report["date"]
    assert report["passed"] is True and report["failures"] == []
    assert report["test_images"] == N_TEST
    assert report["AP_eager"] > 0.5  # the run learnt something: AP parity is not vacuous
    assert abs(report["AP_change"]) <= det.DEFAULT_AP_TOLERANCE
    assert report["images_differing"] == 0 and report["invalid_detections"] == 0
    assert [c["id"] for c in report["categories"]] == list(CATEGORY_IDS)
    return report


def _run_eager(model: Any, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        return [model([im])[0] for im in images]


# ----------------------------------------------------------------------------------------------
# fast: matching and refusals
# ----------------------------------------------------------------------------------------------
def _dets(boxes: list[list[float]], scores: list[float], labels: list[int]
          ) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_match_detections_figures() -> None:
    ref = _dets([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [1, 2])
    same = det.match_detections(ref, _dets([[20, 20, 40, 40], [0, 0, 10, 10]], [0.8, 0.9],
                                           [2, 1]))
    assert same["matched"] == 2 and not same["differ"] and not same["identical"]  # reordered
    assert same["max_abs_box_diff"] == 0 and same["max_abs_score_diff"] == 0
    moved = det.match_detections(ref, _dets([[1, 0, 11, 10], [20, 20, 40, 40]], [0.85, 0.8],
                                            [1, 2]))
    assert moved["matched"] == 2 and moved["max_abs_box_diff"] == pytest.approx(1.0)
    assert moved["max_abs_score_diff"] == pytest.approx(0.05)
    relabelled = det.match_detections(ref, _dets([[0, 0, 10, 10], [20, 20, 40, 40]],
                                                 [0.9, 0.8], [3, 2]))
    assert relabelled["matched"] == 1 and relabelled["differ"]
    extra = det.match_detections(ref, _dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]],
                                            [0.9, 0.8, 0.1], [1, 2, 1]))
    assert extra["matched"] == 2 and extra["differ"] and extra["candidate"] == 3
    assert det.match_detections(ref, ref)["identical"]


@pytest.mark.parametrize(("fmt", "int8", "needle"), [
    ("exported", False, "--format onnx, torchscript or state_dict"),
    ("torchscript", True, "--int8 is not available for detectors"),
    ("hub", False, "for a detector use --format state_dict"),
    ("tflite", False, "choose one of state_dict, torchscript, onnx"),
])
def test_refused_requests_are_one_line(tmp_path: Path, fmt: str, int8: bool, needle: str
                                       ) -> None:
    """Refused before anything is read (the folder is not even a run)."""
    with pytest.raises(ExportError) as err:
        det.export_detector(tmp_path / "no-run", fmt, int8=int8)
    assert needle in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# end to end on the tiny run
# ----------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_state_dict_round_trip(det_run: Path, eager: Any, test_images: list[torch.Tensor],
                               tmp_path: Path) -> None:
    res = det.export_detector(det_run, "state_dict", tmp_path / "det.pt")
    assert res.parity_path == tmp_path / "det.pt.parity.json"
    report = _check_report(res.path, "state_dict")
    assert report["images_identical"] == N_TEST and report["max_abs_box_diff"] == 0
    # the file is weights + metadata, no pickled code, and rebuilds the detector alone
    obj = torch.load(res.path, weights_only=True)
    assert obj["task"] == "detection" and obj["arch"] == ARCH and obj["num_classes"] == 3
    assert {k: obj["detection"][k] for k in DETECTION} == DETECTION
    best = torch.load(det_run / "checkpoints" / "best.pt", weights_only=True)["model"]
    model = det.read_detector(res.path)
    assert not model.training and model.state_dict().keys() == best.keys()
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    _same_detections(_run_eager(model, test_images), _run_eager(eager, test_images), exact=True)


@pytest.mark.e2e
def test_torchscript_round_trip(det_run: Path, eager: Any, test_images: list[torch.Tensor],
                                tmp_path: Path) -> None:
    res = det.export_detector(det_run, "torchscript", tmp_path / "det.ts")
    report = _check_report(res.path, "torchscript")
    assert report["torchscript"] in ("script", "trace")
    with zipfile.ZipFile(res.path) as z:  # a TorchScript file is a zip; its extra files
        name = next(n for n in z.namelist() if n.endswith("/extra/kdlab.json"))
        assert json.loads(z.read(name))["torchscript"] == report["torchscript"]
    model = det.load_detector_artefact(res.path, "torchscript")
    with torch.no_grad():
        got = model(test_images)  # one call, a list of images of three sizes
    _same_detections(got, _run_eager(eager, test_images), exact=False)


@pytest.mark.e2e
def test_onnx_round_trip_through_the_cli(det_run: Path, eager: Any,
                                         test_images: list[torch.Tensor], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    out = tmp_path / "det.onnx"
    assert main(["-q", "export", str(det_run), "--format", "onnx", "--out", str(out)]) == 0
    assert "AP" in capsys.readouterr().out
    report = _check_report(out, "onnx")
    assert report["onnx_opset"] == det.ONNX_OPSET
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == [det.IMAGE_NAME]
    assert [o.name for o in graph.output] == list(det.OUTPUT_NAMES)
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, "height", "width"]
    run = det.load_detector_artefact(out, "onnx")
    _same_detections(run(test_images), _run_eager(eager, test_images), exact=False)


@pytest.mark.e2e
def test_scripted_torchscript(det_run: Path, tmp_path: Path) -> None:
    """The ``torch.jit.script`` path (what a torchvision with its compiled operators gets). Under
    kdlab's torchvision shim the schema of ``torchvision::box_iou_rotated`` is missing, which
    stops scripting; the child process defines it (no kernel: the detector never calls it in
    eval mode), so the scripted artefact is made and checked here too."""
    code = textwrap.dedent(f"""
        import json, torch
        from kdlab.core.torchvision_shim import import_torchvision_for_detection
        import_torchvision_for_detection()
        try:
            torch._C._dispatch_find_schema_or_throw("torchvision::box_iou_rotated", "")
        except RuntimeError:
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor")
        from kdlab.deploy.detection import export_detector
        res = export_detector({str(det_run)!r}, "torchscript", {str(tmp_path / 's.ts')!r})
        print(json.dumps(res.report))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["torchscript"] == "script" and report["passed"]
    assert report["images_differing"] == 0 and abs(report["AP_change"]) <= 0.1


@pytest.mark.e2e
def test_broken_artefact_fails_parity(det_run: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An ONNX file of a detector whose box regression is off (every box shifted by 30 % of
    its size): ParityError after both files are written, the report says why."""
    real = det.save_detector_onnx

    def broken(detector: Any, path: Any, metadata: Any = None) -> None:
        bad = copy.deepcopy(detector)
        with torch.no_grad():
            bad.model.roi_heads.box_predictor.bbox_pred.bias += 3.0
        real(bad, path, metadata)

    monkeypatch.setattr(det, "save_detector_onnx", broken)
    out = tmp_path / "broken.onnx"
    with pytest.raises(ParityError, match=r"\|AP change\|") as err:
        det.export_detector(det_run, "onnx", out)
    assert "\n" not in str(err.value)
    report = json.loads((tmp_path / "broken.onnx.parity.json").read_text())
    assert out.is_file() and report["passed"] is False and report["failures"]
    # the check is two-sided: a tiny detector's AP may even rise with shifted boxes
    assert report["AP_eager"] > 0.5 and abs(report["AP_exported"] - report["AP_eager"]) > 0.1
    assert report["images_differing"] > 0


@pytest.mark.e2e
def test_detection_refusals_name_the_alternatives(det_run: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "export", str(det_run), "--format", "exported"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnx, torchscript or state_dict" in err
    with pytest.raises(ExportError, match="detection run") as e:  # the classification API
        export_run(det_run, "onnx")
    assert "export_detector" in str(e.value)
    with pytest.raises(LatencyError, match="--runtimes eager torchscript onnxruntime") as e2:
        det.run_detector_latency(det_run, LatencySettings(runtimes=("int8",)))
    assert "\n" not in str(e2.value)


@pytest.mark.e2e
def test_latency_rows_of_a_detector(det_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lat"
    assert main(["-q", "latency", str(det_run), "--runs", "3", "--warmup", "1", "--allow-short",
                 "--threads", "1", "--runtimes", "eager", "onnxruntime", "int8",
                 "--out", str(out)]) == 0
    result = json.loads((out / "latency.json").read_text())
    assert result["task"] == "detection"
    rows = result["rows"]
    assert [(r["model"], r["runtime"], r["batch_size"]) for r in rows] == [
        ("student", "eager", 1), ("student", "onnxruntime", 1)]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] and len(r["times_ms"]) == 3
        assert r["ms_per_image"] == r["p50_ms"]
        assert r["images_per_s"] == pytest.approx(1e3 / r["p50_ms"])
        assert r["image_size"] == [SIDE, SIDE] and r["macs_per_image"] > 0
    assert any(n.startswith("int8 skipped") for n in result["notes"])
    assert "| student | MobileNetV2_imagenet |" in (out / "latency.md").read_text()


@pytest.mark.e2e
def test_predict_detections_from_every_source(det_run: Path, eager: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`kdlab predict` on a detection run and on its state-dict, TorchScript and ONNX files:
    COCO results JSON whose boxes are the eager detector's own (in file pixels), the images
    list, one drawn PNG per image; the same detections from every source."""
    import kdlab

    images = det_run.parent / "data" / "test"
    meta = kdlab.load_student(det_run).kdlab_meta
    assert meta["classes"] == [f"class{c}" for c in CATEGORY_IDS]
    first = sorted(images.glob("*.png"))[0]
    assert torch.equal(kdlab.load_student(det_run).preprocess(first), _unit_image(first))
    sources = {"run": det_run}
    for fmt, ext in (("state_dict", ".pt"), ("torchscript", ".ts"), ("onnx", ".onnx")):
        sources[fmt] = tmp_path / f"det{ext}"
        assert main(["-q", "export", str(det_run), "--format", fmt, "--out",
                     str(sources[fmt])]) == 0
    capsys.readouterr()
    found: dict[str, list[dict[str, Any]]] = {}
    for name, source in sources.items():
        out = tmp_path / f"pred_{name}"
        assert main(["-q", "predict", str(source), str(images), "--min-score", "0.05",
                     "--out", str(out)]) == 0
        assert "detections" in capsys.readouterr().out
        found[name] = json.loads((out / "detections.json").read_text())
        listed = json.loads((out / "images.json").read_text())
        assert [i["id"] for i in listed["images"]] == list(range(1, N_TEST + 1))
        assert [c["id"] for c in listed["categories"]] == list(CATEGORY_IDS)
        assert len(list(out.glob("*.png"))) == N_TEST
    ref = found["run"]
    assert ref and {d["category_id"] for d in ref} <= set(CATEGORY_IDS)
    with torch.no_grad():  # the run's detections are the eager detector's, >= 0.05
        own = eager([_unit_image(first)])[0]
    n_own = int((own["scores"] >= 0.05).sum())
    assert len([d for d in ref if d["image_id"] == 1]) == n_own
    for name in ("state_dict", "torchscript", "onnx"):
        assert len(found[name]) == len(ref), name
        for a, b in zip(found[name], ref, strict=True):
            assert a["category_id"] == b["category_id"] and a["image_id"] == b["image_id"]
            assert np.allclose(a["bbox"], b["bbox"], atol=0.01), name
    # a classifier-only option on a detector, and a missing image, are one-line errors
    assert main(["predict", str(det_run), str(tmp_path / "none.png")]) == 2
    assert "no such image" in capsys.readouterr().err


def _unit_image(path: Path) -> torch.Tensor:
    """The PNG at ``path`` as the detection loader feeds it: RGB ``uint8 / 255``, CHW."""
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()
                            ).permute(2, 0, 1).float().div(255)
