"""Feature partners on segmentation: FitNet, AT and ReviewKD on the backbone's stage maps,
FitNet's hint resized to the teacher's size when the output strides differ, the image-level
partners refused, and 1-epoch ``kdlab distill`` runs of DKD + FitNet and of CWD on feature maps
with its projection (docs/segmentation.md, "Partners")."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdlab.config import MethodConfig, SegmentationConfig, validate_config
from kdlab.core.errors import ConfigError
from kdlab.data.batch import Batch
from kdlab.methods.compose import CompositeDistiller, build_method
from kdlab.models.output import ModelOutput
from kdlab.tasks import task_for
from kdlab.tasks.segmentation.model import build_segmenter
from kdlab.tasks.segmentation.task import SegmentationTask, align_hints, hint_pairs

K = 4
SEG = SegmentationConfig(head="fcn")


def _task(method: dict[str, Any], teacher: str = "resnet14") -> SegmentationTask:
    cfg = validate_config({"task": "segmentation", "student": {"arch": "resnet8"},
                           "data": {"name": "fm_segmentation", "root": "x"},
                           "teacher": {"arch": teacher, "random_init": True}, "method": method})
    task = task_for(cfg)
    task.configure(cfg)
    assert isinstance(task, SegmentationTask)
    return task


def _built(method: dict[str, Any], teacher: str = "resnet14", size: int = 48
           ) -> tuple[SegmentationTask, CompositeDistiller, Any, Any, Batch]:
    """The task, the method built as a run builds it, and both models' outputs on a
    ``size`` px batch (larger than the 32 px probe)."""
    task = _task(method, teacher)
    torch.manual_seed(0)
    student, t = build_segmenter("resnet8", K, SEG), build_segmenter(teacher, K, SEG)
    t.eval()
    data = SimpleNamespace(num_classes=K, train_labels=torch.empty(0, dtype=torch.long))
    distiller = build_method(MethodConfig.model_validate(method),
                             task.distill_context(student, t, data))
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, K, (2, size, size), generator=g)
    labels[:, :3] = 255
    batch = Batch(torch.randn(2, 3, size, size, generator=g), labels, torch.arange(2))
    out_s, out_t = task.forward(student, t, batch)
    return task, distiller, out_s, out_t, batch


@pytest.mark.parametrize("partner", ["rkd", "sp", "pkt", "crd"])
def test_image_level_partners_are_refused(partner: str) -> None:
    with pytest.raises(ConfigError, match=f"partner '{partner}'.*image-level vectors"):
        _task({"name": "kd", "partners": [{"name": partner}]})


def test_reviewkd_needs_the_stage_maps_only_and_hints_pair_once() -> None:
    with pytest.raises(ConfigError, match="embedding_level.*set it to false"):
        _task({"name": "kd", "partners": [{"name": "reviewkd"}]})
    _task({"name": "kd", "partners": [{"name": "reviewkd",
                                       "params": {"embedding_level": False}}]})
    two = {"name": "kd", "partners": [{"name": "fitnet", "params": {"hint_layer": 2}},
                                      {"name": "fitnet", "params": {"hint_layer": 2,
                                                                    "teacher_hint_layer": 3}}]}
    with pytest.raises(ConfigError, match="one teacher stage only"):
        _task(two)
    assert hint_pairs(MethodConfig.model_validate(
        {"name": "kd", "partners": [{"name": "fitnet", "params": {"hint_layer": 1,
                                                                  "teacher_hint_layer": 3}},
                                    {"name": "at"}]})) == {1: 3}
    with pytest.raises(ConfigError, match=r"method\.partners\.0\.params"):
        _task({"name": "kd", "partners": [{"name": "fitnet", "params": {"hint_layr": 2}}]})


def test_align_hints_pools_larger_and_interpolates_smaller_student_maps() -> None:
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 5, 8, 8, generator=g),
          torch.randn(2, 6, 4, 4, generator=g)]
    ft = [torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 7, 4, 4, generator=g),
          torch.randn(2, 9, 8, 8, generator=g)]
    out_s = ModelOutput(logits=torch.zeros(2, K), feature_map=fs[-1], features=fs)
    out_t = ModelOutput(logits=torch.zeros(2, K), feature_map=ft[-1], features=ft)
    aligned = align_hints(out_s, out_t, {0: 0, 1: 1, 2: 2, 7: 1})  # 7: left for FitNet
    assert aligned.features[0] is fs[0]                                   # equal sizes
    assert torch.allclose(aligned.features[1], F.avg_pool2d(fs[1], 2))    # 8 -> 4: means
    want = F.interpolate(fs[2], size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(aligned.features[2], want)                      # 4 -> 8: bilinear
    assert out_s.features[1] is fs[1]                                     # input untouched
    assert align_hints(out_s, out_t, {}).features == fs


def test_fitnet_on_stages_of_different_strides_is_the_hint_loss_at_the_teacher_size() -> None:
    """A CIFAR ResNet-8 student (stage 2 at stride 2) with an ImageNet ResNet-18 teacher (stage 2
    at stride 8): the student's hint is average-pooled 4x4 to the teacher's size, the regressor
    is a 1x1 convolution sized on the 32 px probe, and a 48 px batch is distilled."""
    task, d, out_s, out_t, batch = _built(
        {"name": "kd", "partners": [{"name": "fitnet", "params": {"hint_layer": 2}}]},
        teacher="resnet18_imagenet")
    fitnet = d.partners[0]
    conv = fitnet.regressor.conv  # type: ignore[union-attr]
    assert conv.kernel_size == (1, 1) and (conv.in_channels, conv.out_channels) == (32, 128)
    hs, ht = out_s.features[2], out_t.features[2]
    assert hs.shape[-1] == 4 * ht.shape[-1] == 24
    terms = d(*task.distill_inputs(out_s, out_t, batch), 1)
    want = F.mse_loss(fitnet.regressor(F.avg_pool2d(hs, 4)), ht)  # type: ignore[operator]
    assert torch.allclose(terms["fitnet"], 100.0 * want, rtol=1e-5)
    terms["fitnet"].backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_at_and_fitnet_terms_and_gradients_on_segmentation_stages() -> None:
    method = {"name": "dkd", "partners": [{"name": "fitnet"}, {"name": "at"}]}
    task, d, out_s, out_t, batch = _built(method)
    terms = d(*task.distill_inputs(out_s, out_t, batch), 1)
    assert {"ce", "dkd", "fitnet", "at"} <= set(terms)

    def q(f: torch.Tensor) -> torch.Tensor:  # the attention map, written out
        a = f.pow(2).mean(dim=1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    want = sum((q(out_s.features[i]) - q(out_t.features[i])).pow(2).mean() for i in (1, 2, 3))
    assert torch.allclose(terms["at"], 1000.0 * want, rtol=1e-5)
    student_stage = out_s.features[2]
    student_stage.retain_grad()
    (terms["fitnet"] + terms["at"]).backward()
    assert student_stage.grad is not None and student_stage.grad.abs().sum() > 0


def test_reviewkd_runs_on_segmentation_stages() -> None:
    method = {"name": "kd", "partners": [{"name": "reviewkd", "params": {
        "embedding_level": False, "warmup_epochs": 0}}]}
    task, d, out_s, out_t, batch = _built(method)
    terms = d(*task.distill_inputs(out_s, out_t, batch), 1)
    assert torch.isfinite(terms["reviewkd"]) and terms["reviewkd"] > 0
    terms["reviewkd"].backward()
    assert all(p.grad is not None for p in d.partners[0].parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ e2e


def _config(root: Path, name: str, method: dict[str, Any], teacher: str) -> dict[str, Any]:
    return {
        "name": name, "task": "segmentation",
        "data": {"name": "fm_segmentation", "root": str(root), "batch_size": 4,
                 "eval_batch_size": 6, "num_workers": 0},
        "segmentation": {"head": "fcn", "crop_size": 32, "base_size": 32,
                         "scale_range": [0.75, 1.25]},
        "student": {"arch": "resnet8"}, "teacher": {"arch": teacher, "random_init": True},
        "method": method,
        "optim": {"lr": 0.05, "epochs": 1, "scheduler": "cosine"},
        "runtime": {"amp": "off", "channels_last": False, "log_every": 2, "device": "cpu",
                    "threads": 1},
    }


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "teacher", "term"), [
    ({"name": "dkd", "params": {"warmup_epochs": 0}, "partners": [{"name": "fitnet"}]},
     "resnet14", "fitnet"),
    ({"name": "cwd", "params": {"maps": "feature_map"}}, "resnet8x4", "cwd"),
])
def test_distill_with_partner_or_feature_cwd_runs(tmp_path: Path, fm_root: Path,
                                                  method: dict[str, Any], teacher: str,
                                                  term: str) -> None:
    """The FCN heads' feature maps: 16 channels for ResNet-8, 64 for ResNet-8x4 (CWD's
    projection); the method's helper modules are recorded and trained."""
    import json

    from kdlab.cli.main import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(fm_root, term, method, teacher)))
    assert main(["-q", "distill", str(path), "--run-dir", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= rec["test_mIoU"] <= 100.0
    assert rec["train_terms"][term] > 0
    described = json.loads((tmp_path / "run" / "method.json").read_text())
    text = json.dumps(described)
    assert ("ConvRegressor" in text) if term == "fitnet" else ('"projection": [64, 16]' in text)
