"""The segmentation task: config rules, the per-pixel view the methods see, evaluation, and
1-epoch ``kdlab train`` / ``kdlab distill`` runs on the synthetic set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kdlab.config import ExperimentConfig, SegmentationConfig, validate_config
from kdlab.core.errors import ConfigError
from kdlab.data.batch import Batch
from kdlab.losses.dense import pixel_kd_loss
from kdlab.methods.base import DistillContext
from kdlab.methods.logit import KD, KDParams, Vanilla, VanillaParams
from kdlab.models.output import ModelOutput
from kdlab.tasks import get_task, task_for
from kdlab.tasks.segmentation.data import SegmentationEvalBatch
from kdlab.tasks.segmentation.evaluation import sliding_logits
from kdlab.tasks.segmentation.model import SegmentationOutput


def _cfg(**extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"task": "segmentation", "student": {"arch": "resnet8"},
                         "data": {"name": "fm_segmentation", "root": "x"}}
    d.update(extra)
    return d


def test_config_rules() -> None:
    cfg = validate_config(_cfg(segmentation={"head": "fcn", "output_stride": 16}))
    assert isinstance(cfg, ExperimentConfig) and cfg.segmentation.head == "fcn"
    with pytest.raises(ConfigError, match="segmentation section applies to task: segmentation"):
        validate_config({"student": {"arch": "resnet8"}, "segmentation": {}})
    with pytest.raises(ConfigError, match="set task: segmentation"):
        validate_config({"student": {"arch": "resnet8"}, "data": {"name": "voc", "root": "x"}})
    with pytest.raises(ConfigError, match="data.root is required"):
        validate_config(_cfg(data={"name": "cityscapes"}))
    with pytest.raises(ConfigError, match="output_stride"):
        validate_config(_cfg(segmentation={"output_stride": 32}))
    with pytest.raises(ConfigError, match="semantic segmentation data"):
        validate_config(_cfg(data={"name": "cifar100"}))


def test_unsupported_methods_are_refused() -> None:
    cfg = validate_config(_cfg(method={"name": "sd_kd"}))
    with pytest.raises(ConfigError, match="not available for segmentation"):
        task_for(cfg)
    cfg = validate_config(_cfg(method={"name": "kd", "partners": [{"name": "rkd"}]}))
    with pytest.raises(ConfigError, match="partner 'rkd' is not available.*image-level"):
        task_for(cfg)
    # the stage-map partners are accepted (tests/tasks/segmentation/test_seg_partners.py)
    cfg = validate_config(_cfg(method={"name": "kd", "partners": [{"name": "fitnet"},
                                                                  {"name": "at"}]}))
    task_for(cfg).configure(cfg)


def _outputs() -> tuple[SegmentationOutput, SegmentationOutput, Batch]:
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 4, 3, 5, generator=g)
    zt = torch.randn(2, 4, 3, 5, generator=g)
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 0, :3] = 255
    labels[1, 2, 4] = 255
    fmap = torch.zeros(2, 1, 1, 1)
    return (SegmentationOutput(logits=zs, feature_map=fmap),
            SegmentationOutput(logits=zt, feature_map=fmap),
            Batch(torch.zeros(2, 3, 3, 5), labels, torch.arange(2)))


def test_pixel_view_drops_ignored_pixels_and_kd_equals_masked_pixel_kd() -> None:
    task = get_task("segmentation")
    out_s, out_t, batch = _outputs()
    vs, vt, rows = task.distill_inputs(out_s, out_t, batch)
    keep = batch.labels != 255
    assert vs.logits.shape == (int(keep.sum()), 4) == vt.logits.shape
    assert torch.equal(rows.labels, batch.labels[keep])  # b, h, w order
    assert torch.equal(vs.logits[0], out_s.logits[0, :, 0, 3])  # first kept pixel
    # the pixel CE is F.cross_entropy with ignore_index
    probe = ModelOutput(logits=torch.zeros(1, 4), feature_map=torch.zeros(1, 1, 1, 1))
    ctx = DistillContext(student=nn.Identity(), teacher=nn.Identity(),  # type: ignore[arg-type]
                         student_probe=probe, teacher_probe=probe, num_classes=4,
                         train_labels=torch.empty(0))
    ce = Vanilla(VanillaParams(), ctx)(vs, vt, rows, 1)["ce"]
    want = F.cross_entropy(out_s.logits, batch.labels, ignore_index=255)
    assert torch.allclose(ce, want)
    # KD on the rows = the dense pixel-wise KD over the labelled pixels (an independent code)
    kd = KD(KDParams(temperature=2.0, kd_weight=1.0), ctx)(vs, vt, rows, 1)["kd"]
    dense = pixel_kd_loss(out_s.logits, out_t.logits, 2.0, mask=keep)
    assert torch.allclose(kd, dense, atol=1e-6)


def test_aux_term_is_weighted_cross_entropy() -> None:
    task = task_for(validate_config(_cfg(segmentation={"aux_head": True, "aux_weight": 0.4})))
    _, _, batch = _outputs()
    aux = torch.randn(2, 4, 3, 5)

    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> SegmentationOutput:
            return SegmentationOutput(logits=aux.clone(), feature_map=x, aux_logits=aux)

    out_s, out_t = task.forward(Model(), None, batch)
    assert out_t is None
    want = 0.4 * F.cross_entropy(aux, batch.labels, ignore_index=255)
    assert torch.allclose(task.task_terms(out_s)["aux_ce"], want)


class _PixelModel(nn.Module):
    """A per-pixel classifier (1x1 convolution): its logits do not depend on the window."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.num_classes = 3

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.conv(x), feature_map=x)


def test_sliding_windows_average_to_the_whole_image() -> None:
    torch.manual_seed(0)
    model = _PixelModel()
    x = torch.randn(2, 3, 23, 30)
    with torch.no_grad():
        assert torch.allclose(sliding_logits(model, x, 3, 16, 7), model(x).logits, atol=1e-6)
        assert torch.allclose(sliding_logits(model, x, 3, 64, 32), model(x).logits, atol=1e-6)


def test_evaluate_scores_the_confusion_matrix() -> None:
    task = get_task("segmentation")
    model = _PixelModel()
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        pred = model(x).logits.argmax(dim=1)[0]
    label = pred.clone()
    label[0, 0] = (pred[0, 0] + 1) % 3  # one wrong pixel
    label[3, 3] = 255                   # one ignored pixel
    batches = [SegmentationEvalBatch([x[0]], [label], [0])]
    scores = task.evaluate(model, batches, torch.device("cpu"), None)
    assert scores["pixel_acc"] == pytest.approx(100 * 14 / 15)
    assert scores["count"] == 1.0 and "mIoU" in scores
    assert all(0 <= scores[k] <= 100 for k in scores if k.startswith("IoU_"))


# ------------------------------------------------------------------------------------ e2e


def _run_config(root: Path, name: str, **extra: Any) -> dict[str, Any]:
    d = {
        "name": name, "task": "segmentation",
        "data": {"name": "fm_segmentation", "root": str(root), "batch_size": 4,
                 "eval_batch_size": 6, "num_workers": 0},
        "segmentation": {"head": "deeplabv3", "atrous_rates": [1, 2, 3], "aspp_channels": 8,
                         "crop_size": 32, "base_size": 32, "scale_range": [0.75, 1.25],
                         "aux_head": True},
        "student": {"arch": "resnet8"},
        "optim": {"lr": 0.05, "epochs": 1, "scheduler": "cosine"},
        "runtime": {"amp": "off", "channels_last": False, "log_every": 2, "device": "cpu"},
    }
    d.update(extra)
    return d


def _main(*args: str) -> None:
    from kdlab.cli.main import main

    assert main(["-q", *args, "--no-progress"]) == 0


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x, parse_constant=str)
            for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, fm_root: Path) -> Path:
    root = tmp_path_factory.mktemp("seg_teacher")
    path = root / "t.yaml"
    path.write_text(yaml.safe_dump(_run_config(fm_root, "teacher")))
    _main("train", str(path), "--run-dir", str(root / "run"))
    return root / "run"


@pytest.mark.e2e
def test_train_writes_miou(teacher_run: Path) -> None:
    rec = _records(teacher_run)
    assert len(rec) == 1
    for key in ("test_mIoU", "test_pixel_acc", "test_mAcc", "train_pixel_acc"):
        assert 0.0 <= rec[0][key] <= 100.0
    assert {"ce", "aux_ce"} <= set(rec[0]["train_terms"])
    assert (teacher_run / "checkpoints" / "best.pt").exists()


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "term"), [("kd", "kd"), ("sd_map", "sdd")])
def test_distill_writes_miou(tmp_path: Path, fm_root: Path, teacher_run: Path, method: str,
                             term: str) -> None:
    cfg = _run_config(fm_root, method, method={"name": method, "params": {"temperature": 1.0}},
                      teacher={"arch": "resnet8",
                               "checkpoint": str(teacher_run / "checkpoints" / "best.pt")})
    # teacher and student share the segmentation section: the teacher was trained with an
    # auxiliary head, so its checkpoint holds one (the student trains one too)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _main("distill", str(path), "--run-dir", str(tmp_path / "run"))
    rec = _records(tmp_path / "run")[-1]
    assert 0.0 <= rec["test_mIoU"] <= 100.0
    assert {"ce", term, "aux_ce"} <= set(rec["train_terms"]) and rec["train_terms"][term] > 0
    assert torch.isfinite(torch.tensor(list(rec["train_terms"].values()))).all()


#: the methods on maps: their term's name and parameters fitting the 3 x 5 test map
MAP_METHODS = {"cwd": ("cwd", {}), "sd_map": ("sdd", {"scales": [1, 2]})}


@pytest.mark.parametrize("method", ["kd", "dkd", "nkd", "dckd", "dist", "cwd", "sd_map"])
def test_supported_logit_methods_run_on_the_pixel_view(tv: Any, method: str) -> None:
    """Each supported method, built as a run builds it, gives finite terms whose gradient
    reaches the student's segmentation head."""
    from types import SimpleNamespace

    from kdlab.config import MethodConfig
    from kdlab.methods.compose import build_method
    from kdlab.tasks.segmentation.model import build_segmenter

    task = task_for(validate_config(_cfg(method={"name": method},
                                         teacher={"arch": "resnet8", "random_init": True})))
    seg = SegmentationConfig(head="fcn")
    torch.manual_seed(0)
    student, teacher = build_segmenter("resnet8", 4, seg), build_segmenter("resnet8", 4, seg)
    teacher.eval()
    data = SimpleNamespace(num_classes=4, train_labels=torch.empty(0, dtype=torch.long))
    term, params = MAP_METHODS.get(method, (method, {}))
    distiller = build_method(MethodConfig(name=method, params=params),
                             task.distill_context(student, teacher, data))
    _, _, batch = _outputs()
    batch = Batch(torch.randn(2, 3, 3, 5), batch.labels, batch.index)
    out_s, out_t = task.forward(student, teacher, batch)
    terms = distiller(*task.distill_inputs(out_s, out_t, batch), 1)
    assert {"ce", term} <= set(terms) and terms[term] > 0
    total = torch.stack(list(terms.values())).sum()
    assert torch.isfinite(total)
    total.backward()
    assert student.classifier[-1].weight.grad is not None


def test_resized_images_are_scored_at_the_label_resolution() -> None:
    """An image evaluated at half size (``eval_size``): its logits are upsampled bilinearly to
    the label map, and every labelled pixel of the full-size map is scored."""
    from kdlab.tasks.segmentation.evaluation import evaluate_segmentation

    torch.manual_seed(1)
    model = _PixelModel()
    x = torch.randn(3, 4, 4)
    with torch.no_grad():
        up = F.interpolate(model(x[None]).logits, size=(8, 8), mode="bilinear",
                           align_corners=False)
    label = up.argmax(dim=1)[0]
    label[0, :] = 255
    batches = [SegmentationEvalBatch([x], [label], [0])]
    scores, conf = evaluate_segmentation(model, batches, torch.device("cpu"),
                                         SegmentationConfig(), 3)
    assert int(conf.sum()) == 56 and scores["pixel_acc"] == pytest.approx(100.0)
