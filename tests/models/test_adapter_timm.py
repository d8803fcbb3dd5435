"""timm's ViT / DeiT (distilled too) / Swin / ConvNeXt through :func:`kdlab.models.adapter.adapt`.

Every model is built with ``pretrained=False`` at a small size. The references are timm's own
``forward`` (logits), ``forward_features`` (the final map) and ``forward_intermediates`` (the
per-block / per-stage grids, computed by timm's code, not the adapter's). timm imports torchvision;
where torchvision's compiled operators do not load with this torch, the session's ``tv`` fixture
(tests/conftest.py) makes it importable, as for the detection tests. Skipped without timm.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from kdlab.core.errors import ModelError
from kdlab.losses import multiscale_logits
from kdlab.models import create_model
from kdlab.models.adapter import AdaptedModel, adapt

if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed (make setup installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def timm(tv: ModuleType) -> ModuleType:
    """The real timm (imported after torchvision, which the ``tv`` fixture makes importable)."""
    return pytest.importorskip("timm")


SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1),
        "num_heads": (1, 2, 4, 8)}
# name -> (timm model, kwargs, input side, avg-pooled head, token grid, features (C, H, W))
CASES: dict[str, tuple[str, dict[str, Any], int, bool, bool, list[tuple[int, int, int]]]] = {
    "vit_cls": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2}, 32,
                False, True, [(192, 8, 8)] * 3),
    "vit_avg_fc_norm": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2,
                                                 "global_pool": "avg"}, 32,
                        True, True, [(192, 8, 8)] * 3),
    "vit_registers": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2,
                                               "reg_tokens": 4}, 32,
                      False, True, [(192, 8, 8)] * 3),
    "deit_224": ("deit_tiny_patch16_224", {"depth": 2}, 224, False, True, [(192, 14, 14)] * 3),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 4,
                                                           "depth": 2}, 32,
                       False, True, [(192, 8, 8)] * 3),
    "swin": ("swin_tiny_patch4_window7_224", SWIN, 64, True, True,
             [(24, 16, 16), (48, 8, 8), (96, 4, 4), (192, 2, 2)]),
    "convnext": ("convnext_atto", {}, 64, True, False,
                 [(40, 16, 16), (80, 8, 8), (160, 4, 4), (320, 2, 2)]),
}  # fmt: skip


def build(timm: ModuleType, case: str, num_classes: int = 7) -> tuple[nn.Module, Tensor]:
    name, kwargs, side, *_ = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


def expected_map(model: nn.Module, tokens: Tensor, x: Tensor) -> Tensor:
    """timm's ``forward_features`` as a B x C x H x W grid, computed here, not by the adapter."""
    if tokens.dim() == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        return tokens.permute(0, 3, 1, 2)
    if tokens.dim() == 4:
        return tokens
    h, w = model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    grid = tokens[:, model.num_prefix_tokens :]
    return grid.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_adapted_timm_model_matches_timm(timm: ModuleType, one_thread: None, case: str) -> None:
    model, x = build(timm, case)
    _, _, _, avg_head, token_grid, feature_shapes = CASES[case]
    wrapped = adapt(model.eval())
    assert wrapped.preset == "timm" and wrapped.num_classes == 7
    assert wrapped.token_grid is token_grid and AdaptedModel.token_grid is False
    assert wrapped.distillation_token is (case == "deit_distilled")
    with torch.no_grad():
        ref = model(x)
        out = wrapped(x)
        tokens = model.forward_features(x)
        blocks = model.forward_intermediates(x, intermediates_only=True)
        by_class_head = wrapped.classifier(out.embedding)
        by_pooled_map = wrapped.classifier(out.feature_map.mean((2, 3)))
    assert torch.equal(out.logits, ref) and out.dist_logits is None
    assert torch.equal(out.feature_map, expected_map(model, tokens, x))
    assert [tuple(f.shape[1:]) for f in out.features] == feature_shapes
    for ours, theirs in zip(out.features[-len(blocks):], blocks, strict=True):
        assert torch.equal(ours, theirs)
    if case == "deit_distilled":  # eval: timm's mean of both heads; classifier = class head
        torch.testing.assert_close(by_class_head, model.head(tokens[:, 0]), rtol=0, atol=0)
    else:
        torch.testing.assert_close(by_class_head, ref, rtol=0, atol=1e-6)
    if avg_head:  # SDD's global region (the whole map, average-pooled) is the model's logits
        torch.testing.assert_close(by_pooled_map, ref, rtol=1e-5, atol=1e-5)
        local = multiscale_logits(out.feature_map, wrapped.classifier, (1, 2), "direct")
        torch.testing.assert_close(local[:, :, 0], ref, rtol=1e-5, atol=1e-5)
    else:  # a class-token head: the pooled patch tokens are not what the head reads
        assert not torch.allclose(by_pooled_map, ref, atol=1e-3)
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in model.state_dict()}


def test_vit_features_start_with_the_patch_embedding(timm: ModuleType) -> None:
    model, x = build(timm, "vit_cls")
    wrapped = adapt(model.eval())
    with torch.no_grad():
        out = wrapped(x)
        patches = model.patch_embed(x)  # B x N x C, before the position embeddings
    assert wrapped.feature_paths == ["patch_embed", "blocks.0", "blocks.1"]
    assert torch.equal(out.features[0], patches.transpose(1, 2).reshape(2, 192, 8, 8))
    assert wrapped.head_norm_path is None and wrapped.classifier is model.head
    # the embedding is the normed class token (timm's norm is inside forward_features)
    assert torch.equal(out.embedding, model.forward_features(x)[:, 0])


def test_avg_pool_vit_classifier_holds_fc_norm(timm: ModuleType) -> None:
    model, x = build(timm, "vit_avg_fc_norm")
    wrapped = adapt(model.eval())
    assert wrapped.head_norm_path == "fc_norm" and isinstance(model.norm, nn.Identity)
    with torch.no_grad():
        out = wrapped(x)
    # embedding: the mean of the patch tokens, before fc_norm (the input of the head)
    torch.testing.assert_close(out.embedding, model.forward_features(x)[:, 1:].mean(1),
                               rtol=0, atol=0)
    assert wrapped.classifier.linear is model.head and wrapped.classifier.norm is model.fc_norm


def test_distilled_deit_in_training_gives_both_heads(timm: ModuleType) -> None:
    model, x = build(timm, "deit_distilled")
    wrapped = adapt(model).train()
    assert model.distilled_training is True  # set by the wrapper
    assert wrapped.dist_classifier_path == "head_dist" and wrapped.classifier is model.head
    with torch.no_grad():
        out = wrapped(x)
        cls_logits, dist_logits = model(x)  # timm's training output: the pair
        tokens = model.forward_features(x)
    assert torch.equal(out.logits, cls_logits) and torch.equal(out.dist_logits, dist_logits)
    assert torch.equal(out.dist_logits, model.head_dist(tokens[:, 1]))
    assert torch.equal(wrapped.classifier(out.embedding), out.logits)
    assert out.feature_map.shape == (2, 192, 8, 8)  # class and distillation tokens removed
    assert out.detach().dist_logits is not None
    wrapped.eval()
    with torch.no_grad():
        out = wrapped(x)
    assert out.dist_logits is None
    torch.testing.assert_close(out.logits, (cls_logits + dist_logits) / 2, rtol=0, atol=1e-6)


def test_dynamic_img_size_vit_uses_the_inputs_grid(timm: ModuleType) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5,
                              img_size=32, patch_size=4, depth=1, dynamic_img_size=True).eval()
    wrapped = adapt(model)
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        out = wrapped(x)
        assert torch.equal(out.logits, model(x))
    assert out.feature_map.shape == (1, 192, 12, 10)
    assert [tuple(f.shape[2:]) for f in out.features] == [(12, 10), (12, 10)]


def test_token_dropping_is_a_one_line_error(timm: ModuleType) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5,
                              img_size=32, patch_size=4, depth=1, patch_drop_rate=0.5)
    with pytest.raises(ModelError, match="patch_drop_rate=0") as e:
        adapt(model).train()(torch.randn(1, 3, 32, 32))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("name", "distilled"), [("deit_tiny_patch16_224", False),
                                                 ("deit_tiny_distilled_patch16_224", True)])
def test_create_model_builds_timm_deit(timm: ModuleType, one_thread: None, name: str,
                                       distilled: bool) -> None:
    model = create_model(f"timm:{name}", num_classes=10, in_channels=3)
    assert isinstance(model, AdaptedModel) and model.arch == f"timm:{name}"
    assert model.token_grid and model.distillation_token is distilled
    assert model.num_classes == 10
    out = model.probe(input_size=224)  # eval mode: one logits tensor
    assert out.logits.shape == (2, 10) and out.feature_map.shape == (2, 192, 14, 14)
    assert len(out.features) == 13 and out.dist_logits is None


def test_timm_behind_a_broken_torchvision_names_the_torchvision_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """timm imports torchvision: its missing compiled operators are what the error names."""
    for package, code in (("torchvision", "raise RuntimeError('operator torchvision::nms does "
                                          "not exist')\n"),
                          ("timm", "import torchvision\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(code)
        monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError) as e:
        create_model("timm:deit_tiny_patch16_224", 10)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith("arch 'timm:deit_tiny_patch16_224': timm imports torchvision, and "
                           "torchvision ")
    assert "pip install --no-deps torchvision" in text
