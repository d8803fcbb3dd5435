"""The DeiT student (a distillation token and a second head) and the ``deit`` method.

Touvron et al., ICML 2021. The expected totals are written out here from the official
``DistillationLoss`` (facebookresearch/deit ``losses.py``): ``(1 - alpha) * base + alpha * dist``
with ``dist`` the hard CE with the teacher's argmax, or ``tau^2 * KL_sum / numel``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlab.config import MethodConfig
from kdlab.core.errors import ConfigError, MethodError, ModelError
from kdlab.methods import Batch, DistillContext, build_method
from kdlab.models import create_model
from kdlab.models.vit import VisionTransformer

K = 10


def _ctx(student_arch: str = "vit_tiny_distilled") -> DistillContext:
    torch.manual_seed(0)
    student = create_model(student_arch, num_classes=K, in_channels=1)
    teacher = create_model("resnet8", num_classes=K, in_channels=1).eval()
    return DistillContext.from_models(student, teacher, num_classes=K,
                                      train_labels=torch.arange(40) % K, input_size=32)


def _batch(b: int = 6) -> Batch:
    g = torch.Generator().manual_seed(3)
    return Batch(torch.randn(b, 1, 32, 32, generator=g), torch.randint(0, K, (b,), generator=g),
                 torch.arange(b))


def _official_total(z_cls, z_dist, z_t, y, kind, alpha, tau, smoothing):
    base = F.cross_entropy(z_cls, y, label_smoothing=smoothing)
    if kind == "hard":
        dist = F.cross_entropy(z_dist, z_t.argmax(dim=1))
    else:
        p_t = torch.softmax(z_t / tau, dim=1)
        kl = (p_t * (torch.log(p_t) - torch.log_softmax(z_dist / tau, dim=1))).sum()
        dist = kl * tau * tau / z_dist.numel()
    return base * (1 - alpha) + dist * alpha


def test_distilled_vit_heads_and_tokens() -> None:
    model = create_model("vit_tiny_distilled", num_classes=K, in_channels=1)
    assert model.distillation_token and model.token_grid
    x = _batch().images
    train = model.train()(x)
    assert train.dist_logits is not None and train.dist_logits.shape == (6, K)
    assert torch.allclose(train.logits, model.classifier(train.embedding))
    assert train.feature_map.shape == (6, 128, 8, 8)  # both prefix tokens removed
    assert all(f.shape[-2:] == (8, 8) for f in train.features)
    evaluated = model.eval()(x)
    assert evaluated.dist_logits is None
    torch.testing.assert_close(evaluated.logits, (train.logits + train.dist_logits) / 2)
    plain = create_model("vit_tiny", num_classes=K, in_channels=1)
    assert not plain.distillation_token and plain(x).dist_logits is None
    extra = {"embed.dist_token", "head_dist.weight", "head_dist.bias"}
    assert set(model.state_dict()) - set(plain.state_dict()) == extra
    assert model.embed.pos_embed.shape[1] == 2 + 64


def test_distillation_token_needs_the_class_token() -> None:
    with pytest.raises(ModelError, match="class token"):
        VisionTransformer(2, 32, 2, pool="gap", dist_token=True)


@pytest.mark.parametrize(("kind", "alpha", "tau", "smoothing"),
                         [("hard", 0.5, 1.0, 0.0), ("soft", 0.5, 1.0, 0.0),
                          ("soft", 0.3, 3.0, 0.1), ("hard", 1.0, 2.0, 0.1)])
def test_total_equals_the_official_loss(kind: str, alpha: float, tau: float,
                                        smoothing: float) -> None:
    ctx, batch = _ctx(), _batch()
    params = {"type": kind, "alpha": alpha, "tau": tau, "label_smoothing": smoothing}
    method = build_method(MethodConfig(name="deit", params=params), ctx)
    out_s = ctx.student.train()(batch.images)
    with torch.no_grad():
        out_t = ctx.teacher(batch.images).detach()
    terms = method(out_s, out_t, batch, epoch=1)
    assert set(terms) == {"ce", "deit"}
    expected = _official_total(out_s.logits, out_s.dist_logits, out_t.logits, batch.labels,
                               kind, alpha, tau, smoothing)
    torch.testing.assert_close(sum(terms.values()), expected, rtol=1e-5, atol=1e-6)


def test_each_head_learns_from_its_own_term() -> None:
    ctx, batch = _ctx(), _batch()
    method = build_method(MethodConfig(name="deit", params={"type": "soft"}), ctx)
    student = ctx.student.train()
    out_s = student(batch.images)
    with torch.no_grad():
        out_t = ctx.teacher(batch.images).detach()
    terms = method(out_s, out_t, batch, epoch=1)
    terms["deit"].backward(retain_graph=True)
    assert student.classifier.weight.grad is None
    assert student.head_dist.weight.grad.abs().sum() > 0
    assert student.embed.dist_token.grad.abs().sum() > 0
    student.zero_grad(set_to_none=True)
    terms["ce"].backward()
    assert student.head_dist.weight.grad is None
    assert student.classifier.weight.grad.abs().sum() > 0


def test_refuses_a_student_without_a_distillation_token() -> None:
    with pytest.raises(MethodError, match="vit_tiny_distilled"):
        build_method(MethodConfig(name="deit"), _ctx("vit_tiny"))


def test_refuses_eval_mode_outputs() -> None:
    ctx, batch = _ctx(), _batch()
    method = build_method(MethodConfig(name="deit"), ctx)
    out_s = ctx.student.eval()(batch.images)
    with pytest.raises(MethodError, match="training mode"):
        method(out_s, ctx.teacher(batch.images), batch, epoch=1)


@pytest.mark.parametrize("bad", [{"type": "none"}, {"alpha": 1.5}, {"tau": 0.0},
                                 {"label_smoothing": 1.0}, {"beta": 1.0}])
def test_bad_params_are_rejected(bad: dict) -> None:
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"method.params.{key}"):
        build_method(MethodConfig(name="deit", params=bad), _ctx())
