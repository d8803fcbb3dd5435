"""The detection task: configuration checks, the RoI view given to the methods, the loader's
determinism and flips, and end-to-end ``kdlab train`` / ``distill`` / ``eval`` / ``--resume``
runs of a tiny Faster R-CNN on the tiny COCO-format set (see conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.config import DataConfig, DetectionConfig, load_config
from kdlab.core.errors import ConfigError
from kdlab.models.output import ModelOutput

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
DETECTOR_TERMS = {"rpn_objectness", "rpn_box_reg", "roi_box_reg"}


# ----------------------------------------------------------------------------------------------
# 4. configuration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "needle"), [
    ({"name": "mlkd"}, "method 'mlkd'"),
    ({"name": "crd"}, "method 'crd'"),
    ({"name": "rkd"}, "method 'rkd'"),
    ({"name": "dkd", "partners": [{"name": "rkd"}]}, "partner 'rkd'"),
    ({"name": "kd", "partners": [{"name": "crd"}]}, "partner 'crd'"),
])
def test_configure_refuses_image_level_methods(tmp_path: Path, coco_root: Path, run_config: Any,
                                               write_yaml: Any, method: dict[str, Any],
                                               needle: str) -> None:
    from kdlab.tasks import task_for

    cfg = load_config(write_yaml(tmp_path / "c.yaml", run_config(coco_root, method=method)))
    with pytest.raises(ConfigError, match=needle):
        task_for(cfg)


def test_configure_accepts_roi_methods_and_reads_the_section(tmp_path: Path, coco_root: Path,
                                                             run_config: Any,
                                                             write_yaml: Any) -> None:
    from kdlab.tasks import task_for

    method = {"name": "sd_dkd", "partners": [{"name": "reviewkd"}]}
    cfg = load_config(write_yaml(tmp_path / "c.yaml", run_config(coco_root, method=method)))
    task = task_for(cfg)
    assert task.name == "detection" and task.best_metric == "AP"
    assert task.detection.fpn_channels == 16 and task.detection.min_size == 64  # type: ignore


@pytest.mark.parametrize(("change", "needle"), [
    ({"data": {"name": "cifar100"}}, "task 'detection' reads COCO-format data"),
    ({"task": "classification"}, "is a detection dataset"),
    ({"task": "classification", "data": {"name": "cifar100"}}, "detection section applies"),
    ({"data": {"name": "coco", "root": None}}, "data.root is required"),
])
def test_config_refuses_mixed_tasks_and_data(tmp_path: Path, coco_root: Path, run_config: Any,
                                             write_yaml: Any, change: dict[str, Any],
                                             needle: str) -> None:
    cfg = run_config(coco_root)
    for key, value in change.items():
        if isinstance(value, dict):
            cfg[key] = {**({} if key == "data" and value.get("name") == "cifar100" else cfg[key]),
                        **value}
        else:
            cfg[key] = value
    with pytest.raises(ConfigError, match=needle):
        load_config(write_yaml(tmp_path / "c.yaml", cfg))


def test_distill_inputs_is_the_roi_view() -> None:
    from kdlab.tasks.detection.model import DetectorOutput
    from kdlab.tasks.detection.task import DetectionTask

    def out(seed: int) -> DetectorOutput:
        g = torch.Generator().manual_seed(seed)
        roi = ModelOutput(logits=torch.randn(6, 4, generator=g),
                          feature_map=torch.randn(6, 8, 7, 7, generator=g))
        return DetectorOutput(roi=roi, labels=torch.tensor([0, 3, 0, 1, 2, 0]),
                              losses={"rpn_objectness": torch.tensor(1.0)})

    out_s, out_t = out(0), out(1)
    task = DetectionTask()
    roi_s, roi_t, batch = task.distill_inputs(out_s, out_t, object())
    assert roi_s is out_s.roi and roi_t is out_t.roi
    assert torch.equal(batch.labels, out_s.labels)
    assert torch.equal(batch.index, torch.arange(6))
    assert batch.images is out_s.roi.feature_map
    assert task.distill_inputs(out_s, None, object())[1] is None
    assert task.task_terms(out_s) == out_s.losses


# ----------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------


def _loader(coco_root: Path, *, train: bool = True, hflip: bool = True, seed: int = 0,
            batch_size: int = 5) -> Any:
    from kdlab.tasks.detection.coco import CocoDetection
    from kdlab.tasks.detection.data import DetectionLoader

    ds = CocoDetection.from_split(coco_root, "train" if train else "test")
    return DetectionLoader(ds, batch_size, torch.device("cpu"), train=train, seed=seed,
                           hflip=hflip)


def _epoch(loader: Any, epoch: int, start: int = 0) -> list[Any]:
    loader.set_epoch(epoch, start_batch=start)
    return list(loader)


def _same(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.image_ids != y.image_ids:
            return False
        for i, j in zip(x.images, y.images, strict=True):
            if not torch.equal(i, j):
                return False
        for i, j in zip(x.targets, y.targets, strict=True):
            if not (torch.equal(i["boxes"], j["boxes"]) and torch.equal(i["labels"],
                                                                        j["labels"])):
                return False
    return True


def test_loader_batches_are_a_function_of_seed_and_epoch(coco_root: Path) -> None:
    a, b = _loader(coco_root), _loader(coco_root)
    assert len(a) == 2  # 12 images, batch 5: the incomplete batch is dropped
    e1 = _epoch(a, 1)
    assert [len(x.images) for x in e1] == [5, 5]
    assert len({i for x in e1 for i in x.image_ids}) == 10
    _epoch(b, 3)  # another epoch in between changes nothing
    assert _same(_epoch(b, 1), e1)
    assert _same(_epoch(a, 1), e1)  # iterating again
    assert not _same(_epoch(a, 2), e1)
    assert not _same(_epoch(_loader(coco_root, seed=1), 1), e1)
    # resume mid-epoch: batches k.. of that epoch; the start applies once
    assert _same(_epoch(b, 1, start=1), e1[1:])
    assert _same(list(b), e1)


def test_test_loader_keeps_every_image_in_order(coco_root: Path) -> None:
    loader = _loader(coco_root, train=False, batch_size=4)
    loader.set_epoch(5, start_batch=1)  # ignored for evaluation
    batches = list(loader)
    assert [len(x.images) for x in batches] == [4, 2]
    assert [i for x in batches for i in x.image_ids] == loader.dataset.image_ids


def test_hflip_mirrors_image_and_boxes(coco_root: Path) -> None:
    flipped, plain = _loader(coco_root), _loader(coco_root, hflip=False)
    n_flipped = n_plain = 0
    for epoch in (1, 2):
        for x, y in zip(_epoch(flipped, epoch), _epoch(plain, epoch), strict=True):
            assert x.image_ids == y.image_ids  # flips do not change the order
            for img, tgt, img0, tgt0 in zip(x.images, x.targets, y.images, y.targets,
                                            strict=True):
                assert torch.equal(tgt["labels"], tgt0["labels"])
                if torch.equal(img, img0):
                    assert torch.equal(tgt["boxes"], tgt0["boxes"])
                    n_plain += 1
                    continue
                w = img0.shape[-1]
                assert torch.equal(img, img0.flip(-1))
                b0 = tgt0["boxes"]
                want = torch.stack([w - b0[:, 2], b0[:, 1], w - b0[:, 0], b0[:, 3]], dim=1)
                assert torch.equal(tgt["boxes"], want)
                n_flipped += 1
    assert n_flipped > 0 and n_plain > 0
    # the unflipped loader gives the dataset's images scaled to [0, 1]
    ds = plain.dataset
    first = _epoch(plain, 1)[0]
    idx = ds.image_ids.index(first.image_ids[0])
    assert torch.equal(first.images[0], ds[idx].image.float() / 255)
    assert torch.equal(first.targets[0]["boxes"], ds[idx].boxes)


def test_build_detection_data_refuses_fractions(coco_root: Path) -> None:
    from kdlab.tasks.detection.data import build_detection_data

    det = DetectionConfig(train_split="train", test_split="test")
    for bad in ({"val_fraction": 0.1}, {"train_fraction": 0.5}):
        cfg = DataConfig(name="coco", root=str(coco_root), **bad)
        with pytest.raises(ConfigError, match="not supported for detection"):
            build_detection_data(cfg, det, seed=0, device=torch.device("cpu"))
    data = build_detection_data(DataConfig(name="coco", root=str(coco_root), batch_size=4), det,
                                seed=0, device=torch.device("cpu"))
    assert data.num_classes == 3 and data.train_size == 12


# ----------------------------------------------------------------------------------------------
# 5. end to end
# ----------------------------------------------------------------------------------------------


def _main(*args: str) -> None:
    from kdlab.cli.main import main

    assert main(["-q", *args, "--no-progress"] if args[0] in ("train", "distill") else
                ["-q", *args]) == 0


def _records(run: Path) -> list[dict[str, Any]]:
    """The run's epoch records (NaN kept as the string "NaN", so records compare with ==)."""
    return [json.loads(x, parse_constant=str)
            for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, coco_root: Path, run_config: Any,
                write_yaml: Any) -> Path:
    """A ResNet-18 FPN detector trained alone for one epoch (``kdlab train``)."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = write_yaml(root / "t.yaml", run_config(coco_root, name="teacher",
                                                 arch="resnet18_imagenet"))
    _main("train", str(cfg), "--run-dir", str(root / "run"))
    return root / "run"


@pytest.mark.e2e
def test_train_records_detection_metrics(teacher_run: Path) -> None:
    rec = _records(teacher_run)
    assert len(rec) == 1 and rec[0]["epoch"] == 1
    for m in METRICS:
        assert f"test_{m}" in rec[0]
    assert DETECTOR_TERMS | {"ce"} <= set(rec[0]["train_terms"])
    assert all(torch.isfinite(torch.tensor(v)) for v in rec[0]["train_terms"].values())
    assert rec[0]["train_terms"]["ce"] > 0 and rec[0]["train_terms"]["rpn_objectness"] > 0
    assert (teacher_run / "checkpoints" / "best.pt").exists()


@pytest.mark.e2e
def test_load_student_rebuilds_the_detector_without_the_dataset(teacher_run: Path,
                                                                  coco_root: Path) -> None:
    """``kdlab.load_student`` reads the class count from best.pt (no dataset needed) and returns
    the trained detector: its detections equal those of the model the run evaluated."""
    import kdlab
    from kdlab.tasks.detection.coco import CocoDetection
    from kdlab.tasks.detection.model import Detector

    model = kdlab.load_student(teacher_run)
    assert isinstance(model, Detector) and not model.training
    assert model.model.roi_heads.box_predictor.cls_score.out_features == 4  # K = 3, + background
    state = torch.load(teacher_run / "checkpoints" / "best.pt", weights_only=True)
    ref = {k: v for k, v in state["model"].items()}
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    image = CocoDetection.from_split(coco_root, "test")[0].image.float() / 255
    with torch.no_grad():
        out = model([image])[0]
    assert set(out) == {"boxes", "labels", "scores"}


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "terms"), [
    ({"name": "dkd", "params": {"beta": 0.25, "temperature": 1.0, "warmup_epochs": 1},
      "partners": [{"name": "reviewkd", "params": {"embedding_level": False,
                                                   "warmup_epochs": 1}}]},
     {"dkd", "reviewkd"}),
    ({"name": "sd_dkd", "params": {"scales": [1, 2], "beta": 0.25, "temperature": 1.0,
                                   "warmup_epochs": 1}}, {"sdd"}),
    ({"name": "dckd"}, {"dckd"}),
])
def test_distill_end_to_end(tmp_path: Path, coco_root: Path, teacher_run: Path,
                            run_config: Any, write_yaml: Any, method: dict[str, Any],
                            terms: set[str]) -> None:
    cfg = run_config(coco_root, name="student", method=method,
                     teacher=teacher_run / "checkpoints" / "best.pt",
                     teacher_arch="resnet18_imagenet")
    run = tmp_path / "run"
    _main("distill", str(write_yaml(tmp_path / "s.yaml", cfg)), "--run-dir", str(run))
    rec = _records(run)[-1]
    for m in METRICS:
        assert f"test_{m}" in rec
    got = set(rec["train_terms"])
    assert DETECTOR_TERMS | {"ce"} | terms <= got, got
    assert all(torch.isfinite(torch.tensor(v)) for v in rec["train_terms"].values())
    assert all(rec["train_terms"][t] > 0 for t in terms)
    assert (run / "checkpoints" / "best.pt").exists()


@pytest.mark.e2e
def test_eval_writes_scores_and_coco_detections(teacher_run: Path, coco_root: Path) -> None:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from kdlab.tasks.detection.evaluation import coco_metrics

    out = teacher_run / "eval"
    _main("eval", str(teacher_run))
    scores = json.loads((out / "scores.json").read_text(), parse_constant=str)
    assert scores["task"] == "detection" and scores["dataset"] == "coco"
    assert scores["checkpoint"].endswith("best.pt")
    recorded = _records(teacher_run)[-1]
    assert {f"test_{k}": v for k, v in scores["scores"].items() if k != "count"} == \
           {f"test_{m}": recorded[f"test_{m}"] for m in METRICS}
    # more proposals at test time, so that some detections match (AP > 0 below)
    _main("eval", str(teacher_run), "--set", "detection.rpn_pre_nms_top_n_test=1000",
          "--set", "detection.rpn_post_nms_top_n_test=1000")
    scores = json.loads((out / "scores.json").read_text(), parse_constant=str)["scores"]
    dets = json.loads((out / "detections.json").read_text())
    assert isinstance(dets, list) and dets
    assert set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
    ann = coco_root / "annotations" / "instances_test.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        res = gt.loadRes([dict(d) for d in dets])  # pycocotools accepts the file's content
        ev = COCOeval(gt, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert len(res.getAnnIds()) == len(dets)
    assert {d["category_id"] for d in dets} <= {1, 2, 5}
    assert {d["image_id"] for d in dets} <= set(gt.getImgIds())
    assert scores["AP"] > 0 and scores["AR100"] > 0
    assert scores["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-9)
    assert scores["AP50"] == pytest.approx(100 * ev.stats[1], abs=1e-9)
    again = coco_metrics(ann, dets)
    for m in ("AP", "AP50", "AP75", "APs", "AR100"):
        assert again[m] == pytest.approx(scores[m], abs=1e-9), m


# ----------------------------------------------------------------------------------------------
# 6. resume
# ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_resume_is_bit_exact(tmp_path: Path, coco_root: Path, teacher_run: Path,
                             run_config: Any, write_yaml: Any) -> None:
    from support import assert_same

    method = {"name": "dkd", "params": {"beta": 0.25, "temperature": 1.0, "warmup_epochs": 2}}
    cfg = write_yaml(tmp_path / "r.yaml", run_config(
        coco_root, name="resume", method=method, epochs=2,
        teacher=teacher_run / "checkpoints" / "best.pt", teacher_arch="resnet18_imagenet"))
    full, part = tmp_path / "full", tmp_path / "part"
    _main("distill", str(cfg), "--run-dir", str(full))
    _main("distill", str(cfg), "--run-dir", str(part), "--stop-after", "1")
    assert not (part / "summary.json").exists()
    assert len(_records(part)) == 1
    _main("distill", str(cfg), "--run-dir", str(part), "--resume")
    strip = ("train_img_per_s", "train_time_s", "eval_time_s")
    ra = [{k: v for k, v in r.items() if k not in strip} for r in _records(full)]
    rb = [{k: v for k, v in r.items() if k not in strip} for r in _records(part)]
    assert len(ra) == 2 and ra == rb
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert_same(a["model"], b["model"])
    assert_same(a["optimizer"], b["optimizer"])
