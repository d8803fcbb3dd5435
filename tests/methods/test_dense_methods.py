"""The methods on segmentation logit maps (``cwd``, ``sd_map``) compute exactly their pure losses
on the maps the segmentation task's pixel view carries, and are refused for other tasks; CWD on
the heads' feature maps projects the student's channels with its own trained 1x1 convolution."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kdlab.config import MethodConfig, validate_config
from kdlab.core.errors import ConfigError, MethodError
from kdlab.losses.dense import cwd_loss, pixel_sdd_loss
from kdlab.losses.logit import dkd_loss
from kdlab.methods import Batch, DistillContext, build_method
from kdlab.models import create_model
from kdlab.models.output import ModelOutput
from kdlab.tasks.base import task_for
from kdlab.tasks.segmentation.task import pixel_view

B, K, H, W = 2, 4, 8, 8


def _views() -> tuple[ModelOutput, ModelOutput, Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(B, K, H, W, generator=g, requires_grad=True)
    zt = torch.randn(B, K, H, W, generator=g)
    labels = torch.randint(0, K, (B, H, W), generator=g)
    labels[:, :2] = 255
    keep = labels.reshape(-1) != 255
    fmap = torch.zeros(B, 3, H, W)
    out_s = pixel_view(ModelOutput(logits=zs, feature_map=fmap), keep)
    out_t = pixel_view(ModelOutput(logits=zt, feature_map=fmap), keep)
    batch = Batch(torch.zeros(B, 3, H, W), labels.reshape(-1)[keep], torch.arange(int(keep.sum())))
    return out_s, out_t, batch, zs, zt, labels


def _ctx(teacher_arch: str = "resnet8") -> DistillContext:
    student, teacher = create_model("resnet8", num_classes=K), create_model(teacher_arch,
                                                                            num_classes=K)
    return DistillContext.from_models(student, teacher, num_classes=K,
                                      train_labels=torch.empty(0, dtype=torch.long), input_size=32)


def test_sd_map_is_pixel_sdd_on_the_maps() -> None:
    out_s, out_t, batch, zs, zt, labels = _views()
    params = {"base": "dkd", "scales": [1, 2, 4], "temperature": 2.0, "kd_weight": 3.0}
    terms = build_method(MethodConfig(name="sd_map", params=params), _ctx())(
        out_s, out_t, batch, 30)
    want = pixel_sdd_loss(zs, zt, labels, (1, 2, 4), base="dkd",
                          base_kwargs={"alpha": 1.0, "beta": 8.0, "temperature": 2.0})
    assert torch.allclose(terms["sdd"], 3.0 * want, atol=1e-6)
    # scales [1]: DKD on the labelled pixels' rows
    one = build_method(MethodConfig(name="sd_map", params={"scales": [1]}), _ctx())(
        out_s, out_t, batch, 30)
    assert torch.allclose(one["sdd"], dkd_loss(out_s.logits, out_t.logits, batch.labels),
                          atol=1e-6)
    one["sdd"].backward()
    assert zs.grad is not None and zs.grad[:, :, :2].abs().sum() == 0  # ignored rows: no grad


def test_cwd_is_cwd_loss_on_the_whole_maps() -> None:
    out_s, out_t, batch, zs, zt, _ = _views()
    terms = build_method(MethodConfig(name="cwd"), _ctx())(out_s, out_t, batch, 1)
    assert torch.allclose(terms["cwd"], 3.0 * cwd_loss(zs, zt, 4.0), atol=1e-6)


def test_map_methods_need_maps() -> None:
    g = torch.Generator().manual_seed(1)
    rows = ModelOutput(logits=torch.randn(4, K, generator=g), feature_map=torch.zeros(4, 3, 2, 2))
    with pytest.raises(MethodError, match="task: segmentation"):
        build_method(MethodConfig(name="cwd"), _ctx())(rows, rows, Batch(
            torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long), torch.arange(4)), 1)
    cfg = validate_config({"student": {"arch": "resnet8"}, "method": {"name": "sd_map"},
                           "teacher": {"arch": "resnet8", "random_init": True}})
    with pytest.raises(ConfigError, match="sd_map.*task: segmentation"):
        task_for(cfg).configure(cfg)


def _feature_views(c_t: int, h_t: int = H) -> tuple[ModelOutput, ModelOutput, Batch, torch.Tensor,
                                                   torch.Tensor]:
    """The pixel views with 64-channel student and ``c_t``-channel teacher feature maps (the
    widths of ResNet-8's and ResNet-8(x4)'s final maps, as the probes of :func:`_ctx` see)."""
    out_s, out_t, batch, *_ = _views()
    g = torch.Generator().manual_seed(2)
    fs = torch.randn(B, 64, H, W, generator=g, requires_grad=True)
    ft = torch.randn(B, c_t, h_t, h_t, generator=g)
    return (dataclasses.replace(out_s, feature_map=fs), dataclasses.replace(out_t, feature_map=ft),
            batch, fs, ft)


def test_cwd_on_equal_width_feature_maps_is_cwd_loss_without_projection() -> None:
    out_s, out_t, batch, fs, ft = _feature_views(64)
    method = build_method(MethodConfig(name="cwd", params={"maps": "feature_map"}), _ctx())
    assert method.logit.projection is None and not list(method.parameters())
    terms = method(out_s, out_t, batch, 1)
    assert torch.allclose(terms["cwd"], 3.0 * cwd_loss(fs, ft, 4.0), atol=1e-6)
    # the default still distils the logit maps, not the feature maps
    logits = build_method(MethodConfig(name="cwd"), _ctx())(out_s, out_t, batch, 1)
    assert torch.allclose(logits["cwd"], 3.0 * cwd_loss(out_s.dense_logits, out_t.dense_logits,
                                                        4.0), atol=1e-6)


def test_cwd_projection_maps_student_channels_and_is_trained() -> None:
    from kdlab.engine.build import trainable_parameters

    out_s, out_t, batch, fs, ft = _feature_views(256, h_t=H // 2)
    ctx = _ctx("resnet8x4")
    method = build_method(MethodConfig(name="cwd", params={"maps": "feature_map",
                                                           "temperature": 2.0}), ctx)
    proj = method.logit.projection
    assert proj is not None and proj.weight.shape == (256, 64, 1, 1) and proj.bias is not None
    assert method.describe()["logit"]["resolved"] == {"projection": [256, 64]}
    # the pure loss compares maps of one shape only: the projection is the method's
    with pytest.raises(MethodError, match="same shape"):
        cwd_loss(fs, ft, 2.0)
    terms = method(out_s, out_t, batch, 1)
    # 1x1 convolution written out, then the 2x2 means of the teacher's half-size grid
    mapped = torch.einsum("oc,bchw->bohw", proj.weight[:, :, 0, 0], fs) + proj.bias[:, None, None]
    want = cwd_loss(F.avg_pool2d(mapped, 2), ft, 2.0)
    assert torch.allclose(terms["cwd"], 3.0 * want, atol=1e-5)
    terms["cwd"].backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert proj.bias.grad is not None and fs.grad is not None and fs.grad.abs().sum() > 0
    ids = {id(p) for p in trainable_parameters(ctx.student, method)}
    assert {id(proj.weight), id(proj.bias)} <= ids  # trained with the student
