"""The ViT zoo (:mod:`kdlab.models.vit`): shapes, the ModelOutput contract, the attention against
a float64 reference, position-embedding resampling, and distillation with a ViT student."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.cli.main import main
from kdlab.config import MethodConfig
from kdlab.core.errors import ModelError
from kdlab.losses.sdd import multiscale_logits
from kdlab.methods import Batch, DistillContext, build_method
from kdlab.models import create_model, list_models
from kdlab.models.vit import Attention, VisionTransformer, resample_pos_embed

# name: (depth, width, pool)
SIZES = {
    "vit_tiny": (4, 128, "cls"),
    "vit_lite_6": (6, 256, "cls"),
    "vit_lite_7": (7, 256, "cls"),
    "vit_lite_7_gap": (7, 256, "gap"),
}
K = 10


def _model(name: str = "vit_tiny", seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=K)
    assert isinstance(model, VisionTransformer)
    return model


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_output_shapes(name: str, size: int) -> None:
    depth, width, pool = SIZES[name]
    model = _model(name).eval()
    assert model.pool == pool and len(model.blocks) == depth
    side = size // 4
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.logits.shape == (2, K) and torch.isfinite(out.logits).all()
    assert out.feature_map.shape == (2, width, side, side)
    assert out.embedding is not None and out.embedding.shape == (2, width)
    assert [tuple(f.shape) for f in out.features] == [(2, width, side, side)] * (depth + 1)
    assert out.preact_features == []


@pytest.mark.parametrize("name", sorted(SIZES))
def test_logits_are_the_head_on_the_embedding(name: str) -> None:
    model = _model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
        assert out.embedding is not None
        assert torch.equal(model.classifier(out.embedding), out.logits)
        pooled = model.classifier(out.feature_map.mean((2, 3)))
    if SIZES[name][2] == "gap":
        assert torch.equal(pooled, out.logits)
    else:  # the class token's logits are not the pooled patch tokens' (kdlab's definition)
        assert not torch.allclose(pooled, out.logits)


def test_feature_map_is_the_normed_patch_tokens() -> None:
    model = _model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
        last = out.features[-1].flatten(2).transpose(1, 2)  # last block, class token removed
        want = model.norm(last).transpose(1, 2).reshape(out.feature_map.shape)
    torch.testing.assert_close(out.feature_map, want)


def _reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """``proj(softmax(q k^T / sqrt(d)) v)`` in float64 from the module's own weights."""
    w, b = attn.qkv.weight.double(), attn.qkv.bias.double()
    x = x.double()
    bsz, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = (x @ w.T + b).reshape(bsz, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(bsz, n, c)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


def test_attention_matches_a_float64_reference() -> None:
    attn = _model().blocks[0].attn.eval()
    with torch.no_grad():  # larger weights than the init: peaked, non-uniform attention
        torch.nn.init.normal_(attn.qkv.weight, std=0.2)
        torch.nn.init.normal_(attn.qkv.bias, std=0.1)
        torch.nn.init.normal_(attn.proj.bias, std=0.1)
        x = torch.randn(2, 65, 128)
        got = attn(x)
        want = _reference_attention(attn, x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_gradients_reach_every_parameter(pool: str) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(2, 64, 4, pool=pool, num_classes=K).train()  # type: ignore[arg-type]
    out = model(torch.randn(2, 3, 32, 32))
    (out.logits.square().sum() + out.feature_map.square().mean()).backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, key


def test_position_embedding_resampling() -> None:
    model = _model().eval()
    grid = model.embed.pos_embed[:, 1:]
    assert resample_pos_embed(grid, (8, 8)) is grid  # identity: no interpolation at 32 px
    x = torch.randn(2, 3, 48, 48)
    # a model made for 48 px holding the resampled embeddings = the 32-px model resampling at
    # run time (so 32 -> 48 changes nothing but the embeddings)
    big = VisionTransformer(4, 128, 4, 2.0, img_size=48, num_classes=K)
    state = model.state_dict()
    with torch.no_grad():
        cls_pos = model.embed.pos_embed[:, :1]
        state["embed.pos_embed"] = torch.cat([cls_pos, resample_pos_embed(grid, (12, 12))], 1)
    big.load_state_dict(state)
    with torch.no_grad():
        out_32 = model(x)
        out_48 = big.eval()(x)
        # the 48-px model's grid matches the input: no resampling, same logits
        torch.testing.assert_close(out_48.logits, out_32.logits, rtol=0, atol=0)
        assert big(torch.randn(2, 3, 32, 32)).feature_map.shape == (2, 128, 8, 8)  # 12 -> 8
    assert out_32.feature_map.shape == (2, 128, 12, 12) and torch.isfinite(out_32.logits).all()


def test_resampled_embeddings_interpolate_the_grid() -> None:
    """A linear ramp stays a ramp (bicubic resampling keeps smooth grids smooth)."""
    ramp = torch.arange(8.0).repeat(8, 1)  # 8x8, value = column index
    grid = ramp.reshape(1, 64, 1)
    up = resample_pos_embed(grid, (16, 16)).reshape(16, 16)
    assert torch.allclose(up[0], up[5])  # rows equal
    assert (up[:, 1:] >= up[:, :-1] - 1e-5).all()  # increasing along columns
    assert resample_pos_embed(grid, (4, 6)).shape == (1, 24, 1)


def test_bad_arguments_are_model_errors() -> None:
    with pytest.raises(ModelError, match="not divisible by patch"):
        _model()(torch.randn(1, 3, 30, 30))
    with pytest.raises(ModelError, match="pool"):
        VisionTransformer(2, 64, 4, pool="mean")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="num_heads"):
        VisionTransformer(2, 66, 4)
    with pytest.raises(ModelError, match="img_size"):
        VisionTransformer(2, 64, 4, img_size=30)


def test_single_channel_input() -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=K, in_channels=1).eval()
    assert model.patch_embed.weight.shape == (128, 1, 4, 4)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).feature_map.shape == (2, 128, 7, 7)


def test_registered_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(SIZES) <= set(list_models())
    model = create_model("vit_tiny", num_classes=10)
    assert isinstance(model, VisionTransformer) and model.arch == "vit_tiny"
    assert main(["models"]) == 0
    listed = capsys.readouterr().out.split()
    assert set(SIZES) <= set(listed)


def _distill_terms(method: str) -> tuple[dict[str, torch.Tensor], VisionTransformer]:
    """One step of ``method`` with a vit_tiny student and a random resnet8 teacher."""
    student = _model("vit_tiny", seed=0).train()
    torch.manual_seed(1)
    teacher = create_model("resnet8", num_classes=K).eval()
    ctx = DistillContext.from_models(student, teacher, num_classes=K,
                                     train_labels=torch.arange(20) % K, input_size=32)
    distiller = build_method(MethodConfig(name=method), ctx)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    with torch.no_grad():
        out_t = teacher(x).detach()
    terms = distiller(student(x), out_t, Batch(x, y, torch.arange(4)), epoch=30)
    sum(terms.values()).backward()
    return terms, student


@pytest.mark.parametrize("method", ["sd_dkd", "dckd", "fitnet"])
def test_distillation_with_a_vit_student_and_a_cnn_teacher(method: str) -> None:
    """SD-DKD and DCKD work unchanged; FitNet works too: the ViT's block grids are maps
    (8x8 tokens vs resnet8's 16x16 stage 2: a transposed-conv regressor)."""
    terms, student = _distill_terms(method)
    key = {"sd_dkd": "sdd", "dckd": "dckd", "fitnet": "fitnet"}[method]
    assert key in terms
    assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    assert student.patch_embed.weight.grad is not None
    assert torch.isfinite(student.patch_embed.weight.grad).all()
    assert student.classifier.weight.grad is not None


def test_sdd_regions_of_a_cls_vit_are_the_head_on_pooled_tokens() -> None:
    """kdlab's definition: SDD's local logits of a class-token ViT are the head on average-pooled
    normed patch tokens (region 0 is the head on their mean, not the class-token logits)."""
    model = _model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
        local = multiscale_logits(out.feature_map, model.classifier, (1, 2))
        want0 = model.classifier(out.feature_map.mean((2, 3)))
        want1 = model.classifier(F.avg_pool2d(out.feature_map, 4).flatten(2).transpose(1, 2))
    torch.testing.assert_close(local[:, :, 0], want0)
    torch.testing.assert_close(local[:, :, 1:5], want1.transpose(1, 2))
