"""The ``dist``, ``ttm`` and ``wttm`` logit methods: terms, weights, defaults, composition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdlab.methods.dist  # noqa: F401  (registers the methods)
import kdlab.methods.wttm  # noqa: F401
from kdlab.config import MethodConfig
from kdlab.core.errors import ConfigError
from kdlab.losses import dist_loss, ttm_loss, wttm_loss
from kdlab.methods.base import Batch, DistillContext
from kdlab.methods.compose import build_method, build_params
from kdlab.methods.registry import get_method
from support import TinyNet

K, B = 7, 6



def setup():
    student, teacher = TinyNet(4, 4, 0, K), TinyNet(4, 4, 1, K)
    ctx = DistillContext.from_models(student, teacher, num_classes=K,
                                     train_labels=torch.arange(40) % K, input_size=16)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(B, 3, 16, 16, generator=g)
    batch = Batch(images=images, labels=torch.randint(0, K, (B,), generator=g),
                  index=torch.arange(B))
    out_s = student(images)
    with torch.no_grad():
        out_t = teacher(images)
    return ctx, batch, out_s, out_t


def test_dist_terms_and_official_cifar_defaults() -> None:
    ctx, batch, out_s, out_t = setup()
    p = build_params("dist", {}, "method.params")
    assert (p.ce_weight, p.kd_weight, p.beta, p.gamma, p.temperature) == (1.0, 2.0, 1.0, 1.0, 4.0)
    terms = get_method("dist")(p, ctx)(out_s, out_t, batch, 1)
    assert set(terms) == {"ce", "dist"}
    ce = F.cross_entropy(out_s.logits, batch.labels)
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["dist"], 2.0 * dist_loss(out_s.logits, out_t.logits))
    q = build_params("dist", {"ce_weight": 0.5, "kd_weight": 1.0, "beta": 2.0, "gamma": 0.0,
                              "temperature": 1.0}, "method.params")
    terms = get_method("dist")(q, ctx)(out_s, out_t, batch, 1)
    torch.testing.assert_close(terms["ce"], 0.5 * ce)
    torch.testing.assert_close(terms["dist"], dist_loss(out_s.logits, out_t.logits, 2.0, 0.0,
                                                        1.0))


@pytest.mark.parametrize(("name", "fn", "gamma", "weight"),
                         [("wttm", wttm_loss, 0.2, 4.0), ("ttm", ttm_loss, 0.1, 45.0)])
def test_ttm_wttm_terms_and_readme_defaults(name, fn, gamma, weight) -> None:
    ctx, batch, out_s, out_t = setup()
    p = build_params(name, {}, "method.params")
    assert (p.ce_weight, p.kd_weight, p.gamma) == (1.0, weight, gamma)
    terms = get_method(name)(p, ctx)(out_s, out_t, batch, 1)
    assert set(terms) == {"ce", name}
    torch.testing.assert_close(terms["ce"], F.cross_entropy(out_s.logits, batch.labels))
    torch.testing.assert_close(terms[name], weight * fn(out_s.logits, out_t.logits, gamma))
    # no warm-up: the same at epoch 1 and 200
    torch.testing.assert_close(get_method(name)(p, ctx)(out_s, out_t, batch, 200)[name],
                               terms[name])


def test_wttm_composes_with_crd_as_the_official_combination() -> None:
    """``--distill crd --add wttm -b 0.8 -a 4``: CE 1 + 4 WTTM + 0.8 CRD."""
    ctx, batch, out_s, out_t = setup()
    cfg = MethodConfig(name="wttm", params={"gamma": 0.2, "kd_weight": 4.0},
                       partners=[{"name": "crd", "params": {"weight": 0.8, "nce_k": 8,
                                                             "feat_dim": 4}}])
    method = build_method(cfg, ctx)
    assert method.describe()["name"] == "wttm+crd"
    terms = method(out_s, out_t, batch, 1)
    assert set(terms) == {"ce", "wttm", "crd"}
    torch.testing.assert_close(terms["wttm"], 4.0 * wttm_loss(out_s.logits, out_t.logits, 0.2))
    assert all(torch.isfinite(v) for v in terms.values())
    assert any(p.requires_grad for p in method.parameters())  # CRD's embedding heads


@pytest.mark.parametrize(("name", "params", "key"), [
    ("wttm", {"gamma": 0.0}, "method.params.gamma"),
    ("ttm", {"gamma": -1.0}, "method.params.gamma"),
    ("dist", {"temperature": 0.0}, "method.params.temperature"),
    ("dist", {"tau": 4.0}, "method.params.tau"),
])
def test_bad_params_are_one_line_config_errors(name: str, params: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_params(name, params, "method.params")
    assert key in str(e.value) and "\n" not in str(e.value)
