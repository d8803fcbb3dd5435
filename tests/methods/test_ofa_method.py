"""The ``ofa`` method (OFA-KD, Hao et al., NeurIPS 2023): its loss against a hand computation, the
gradients into the projectors and the student, the projector shapes against the official rules,
parameter errors and one training step for CNN and ViT students and teachers.

The official rules below are written out from Hao840/OFAKD ``distillers/ofa.py`` (``OFA.__init__``)
and ``custom_forward/{resnet,vision_transformer}.py`` (``stage_info``), not read from kdlab.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from kdlab.config import MethodConfig
from kdlab.core.errors import ConfigError, MethodError
from kdlab.engine.build import trainable_parameters
from kdlab.methods import Batch, DistillContext, build_method
from kdlab.methods.ofa import (
    OFA,
    CNNProjectorPlan,
    OFAParams,
    PatchMerging,
    TokenProjectorPlan,
    build_projector,
    cnn_projector_plan,
    default_stages,
    official_vit_stage,
    token_projector_plan,
)
from kdlab.models import create_model
from kdlab.models.output import KdModel
from kdlab.models.vit import VisionTransformer
from support import TinyNet, run_distill, save_random_teacher

K = 10


def context(student: KdModel, teacher: KdModel, size: int = 32) -> DistillContext:
    return DistillContext.from_models(student, teacher.eval(), num_classes=student.num_classes,
                                      train_labels=torch.arange(20) % K, input_size=size)


def batch(b: int = 4, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, K, (b,), generator=g),
                 torch.arange(b))


def ofa(ctx: DistillContext, **params: object) -> OFA:
    distiller = build_method(MethodConfig(name="ofa", params=params), ctx).logit
    assert isinstance(distiller, OFA)
    return distiller


def official_ofa_loss(zs: Tensor, zt: Tensor, y: Tensor, eps: float, t: float) -> Tensor:
    """Test-side transcription of the official ``ofa_loss`` (in float64)."""
    mask = F.one_hot(y, zs.shape[1]).double()
    ps, pt = F.softmax(zs.double() / t, dim=1), F.softmax(zt.double() / t, dim=1)
    return torch.sum(-((pt + mask) ** eps - mask) * torch.log(ps), dim=-1).mean()


@pytest.fixture(scope="module")
def cnn_pair() -> tuple[KdModel, KdModel]:
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=K), create_model("resnet14", num_classes=K)


# ------------------------------------------------------------------------------ the loss
def test_terms_equal_a_hand_computation(cnn_pair) -> None:
    student, teacher = cnn_pair
    params = {"ce_weight": 0.5, "ofa_weight": 0.3, "kd_weight": 2.0, "eps": [1.0, 1.2, 1.5, 2.0],
              "temperature": 2.0, "label_smoothing": 0.1}
    distiller, b = ofa(context(student, teacher), **params), batch()
    out_s = student(b.images)
    with torch.no_grad():
        out_t = teacher(b.images)
    terms = distiller(out_s, out_t, b, epoch=1)
    assert list(terms) == ["ce", "ofa_stage1", "ofa_stage2", "ofa_stage3", "ofa_logits"]
    y, zt = b.labels, out_t.logits
    want = {"ce": 0.5 * F.cross_entropy(out_s.logits, y, label_smoothing=0.1),
            "ofa_logits": 2.0 * official_ofa_loss(out_s.logits, zt, y, 2.0, 2.0)}
    for stage, eps in zip((1, 2, 3), (1.0, 1.2, 1.5), strict=True):
        branch = distiller.projectors[str(stage)](out_s.features[stage])
        want[f"ofa_stage{stage}"] = 0.3 * official_ofa_loss(branch, zt, y, eps, 2.0)
    for key, value in want.items():
        torch.testing.assert_close(terms[key].double(), value.double(), rtol=1e-5, atol=1e-6)


def test_one_eps_is_used_for_every_term(cnn_pair) -> None:
    student, teacher = cnn_pair
    ctx = context(student, teacher)
    assert ofa(ctx, eps=1.5).eps == [1.5] * 4
    assert ofa(ctx, eps=[1.5]).eps == [1.5] * 4
    assert ofa(ctx, stages=[3, 1], eps=[1.0, 2.0, 3.0]).eps == [1.0, 2.0, 3.0]


def test_gradients_reach_the_projectors_and_the_student_not_the_teacher(cnn_pair) -> None:
    student, teacher = cnn_pair
    distiller, b = ofa(context(student, teacher)), batch()
    student.zero_grad()
    with torch.no_grad():
        out_t = teacher(b.images)
    terms = distiller(student(b.images), out_t, b, epoch=1)
    terms["ofa_stage1"].backward()  # a branch term alone reaches its projector and the stem
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in distiller.projectors["1"].parameters())
    assert student.classifier.weight.grad is None  # the branch bypasses the student's head
    assert any(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # the models are referenced, not owned: only projector parameters
    owned = {id(p) for p in distiller.parameters()}
    assert not owned & {id(p) for p in [*student.parameters(), *teacher.parameters()]}
    assert all(k.startswith("projectors.") for k in distiller.state_dict())
    assert {id(p) for p in trainable_parameters(student, distiller)} >= owned


def test_features_under_bf16_autocast_give_float32_terms() -> None:
    torch.manual_seed(0)
    student, teacher = create_model("vit_tiny", num_classes=K), create_model("resnet8",
                                                                            num_classes=K)
    distiller, b = ofa(context(student, teacher)), batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_s = student(b.images)
        with torch.no_grad():
            out_t = teacher(b.images)
    terms = distiller(out_s, out_t, b, epoch=1)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


# ------------------------------------------------------------------------------ official rules
# ResNet18 at 224 px (official stage_info): stages 1-4 are (64, 56), (128, 28), (256, 14),
# (512, 7); pooled width 512. DeiT-T: 197 tokens (a 14 x 14 grid + the class token), width 192,
# stages 1-4 at blocks 2, 4, 10, 12 (indices 1, 3, 9, 11). Swin-T's pooled width: 768.
# OFA.__init__ (CNN student): stage < 4 -> (4 - stage) SepConvs, the channels doubling and the
# last one to max(C_s, C_t); stage 4 -> a 1x1 conv to max(C_s, C_t); pool, Linear(max, K).
OFFICIAL_RESNET18 = {  # teacher width -> stage -> (SepConv (in, out) list, 1x1 conv, head in)
    192: {1: ([(64, 128), (128, 256), (256, 512)], None, 512),
          2: ([(128, 256), (256, 512)], None, 512),
          3: ([(256, 512)], None, 512),
          4: ([], (512, 512), 512)},
    768: {1: ([(64, 128), (128, 256), (256, 768)], None, 768),
          2: ([(128, 256), (256, 768)], None, 768),
          3: ([(256, 768)], None, 768),
          4: ([], (512, 768), 768)},
}
# OFA.__init__ (ViT student): merge_num = max(int(log2(14 / 7)), 0) = 1 PatchMerging
# (14x14, 192 -> 192, GELU: the first merge always has it), then max(4 - stage, 1) Blocks of
# width 192 with 4 heads, the class token (TokenFilter), Linear(192, K).
OFFICIAL_DEIT_T = {stage: (((14, 192, 192, True),), blocks)
                   for stage, blocks in {1: 3, 2: 2, 3: 1, 4: 1}.items()}


@pytest.mark.parametrize("teacher_dim", [192, 768])
def test_cnn_plans_follow_the_official_resnet18_rules(teacher_dim: int) -> None:
    for stage, (convs, pointwise, head) in OFFICIAL_RESNET18[teacher_dim].items():
        in_chans = (64, 128, 256, 512)[stage - 1]
        plan = cnn_projector_plan(in_chans, stage, 4, 512, teacher_dim)
        assert plan == CNNProjectorPlan(tuple(convs), pointwise, head)


def test_cnn_projector_output_shapes_at_224() -> None:
    for stage, (c, side) in enumerate([(64, 56), (128, 28), (256, 14), (512, 7)], start=1):
        proj = build_projector(cnn_projector_plan(c, stage, 4, 512, 768), K).eval()
        x = torch.randn(2, c, side, side)
        assert proj[:-3](x).shape == (2, 768, 7, 7)  # the SepConv chain ends at the 7x7 map
        assert proj(x).shape == (2, K)


def test_vit_plans_follow_the_official_deit_t_rules() -> None:
    assert [official_vit_stage(b, 12) for b in range(1, 13)] == [1, 1, 2, 2, 3, 3, 3, 3, 3, 3,
                                                                  4, 4]
    assert default_stages(12, token_grid=True) == [2, 4, 10, 12]
    assert default_stages(4, token_grid=False) == [1, 2, 3, 4]
    for block, stage in zip((2, 4, 10, 12), (1, 2, 3, 4), strict=True):
        merges, blocks = OFFICIAL_DEIT_T[stage]
        plan = token_projector_plan((14, 14), 192, official_vit_stage(block, 12), 192, True)
        assert plan == TokenProjectorPlan(merges, None, blocks, 192, "cls")
        proj = build_projector(plan, K)
        assert proj(torch.randn(2, 192, 14, 14)).shape == (2, K)
    # two merges from a 28x28 grid: GELU on the first, none on the last (the official loop)
    two = token_projector_plan((28, 28), 96, 1, 768, False)
    assert two.merges == ((28, 96, 768, True), (14, 768, 768, False)) and two.pool == "mean"


@pytest.fixture(scope="module")
def stand_ins_224() -> tuple[KdModel, KdModel]:
    """kdlab's ResNet18 and a DeiT-T-sized kdlab ViT (12 blocks, width 192, 3 heads, 16-px
    patches), to be probed at 224 px."""
    torch.manual_seed(0)
    return (create_model("resnet18_imagenet", num_classes=K),
            VisionTransformer(12, 192, 3, 4.0, patch_size=16, img_size=224, num_classes=K))


def test_kdlab_resnet18_at_224_gets_the_official_projectors(stand_ins_224) -> None:
    resnet18, deit_t = stand_ins_224
    cnn = ofa(context(resnet18, deit_t, size=224))
    assert cnn.stages == [1, 2, 3, 4]
    for stage, (convs, pointwise, _) in OFFICIAL_RESNET18[192].items():
        proj = cnn.projectors[str(stage)]
        got = [(m.op[0].in_channels, m.op[5].out_channels) for m in proj[:-3]
               if not isinstance(m, nn.Conv2d)]
        assert got == convs
        assert (pointwise is not None) == isinstance(proj[0], nn.Conv2d)


def test_kdlab_deit_t_at_224_gets_the_official_projectors(stand_ins_224) -> None:
    resnet18, deit_t = stand_ins_224
    vit = ofa(context(deit_t, resnet18, size=224))
    assert vit.stages == [2, 4, 10, 12]
    for block, stage in zip(vit.stages, (1, 2, 3, 4), strict=True):
        proj = vit.projectors[str(block)]
        assert len(proj.merges) == 1 and proj.merges[0].reduction.in_features == 4 * 192
        assert len(proj.blocks) == OFFICIAL_DEIT_T[stage][1] and proj.cls_token is not None


def test_patch_merging_equals_the_official_token_order() -> None:
    """The official PatchMerging reads B x (H*W) x C tokens row-major (``x.view(B, H, W, C)``);
    kdlab's features are the same tokens as a B x C x H x W grid."""
    torch.manual_seed(0)
    merge = PatchMerging(8, 16, gelu=True)
    tokens = torch.randn(2, 6 * 4, 8)
    x = tokens.view(2, 6, 4, 8)
    official = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                          x[:, 1::2, 1::2]], -1).view(2, -1, 32)
    official = F.gelu(merge.reduction(merge.norm(official)))
    grid = tokens.transpose(1, 2).reshape(2, 8, 6, 4)  # kdlab's ModelOutput layout
    torch.testing.assert_close(merge(grid.permute(0, 2, 3, 1)).flatten(1, 2), official)


def test_kdlab_32px_adaptation() -> None:
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=K)
    vit = ofa(context(create_model("vit_tiny", num_classes=K), teacher))
    assert vit.stages == [1, 3, 4]  # depth 4: the official stage ends scaled to 1, 1, 3, 4
    for stage, blocks in zip(vit.stages, (3, 1, 1), strict=True):
        proj = vit.projectors[str(stage)]
        assert len(proj.merges) == 0 and len(proj.blocks) == blocks  # 8x8 grid: no merging
        assert proj.cls_token is not None
    gap = ofa(context(create_model("vit_lite_7_gap", num_classes=K), teacher))
    assert gap.stages == [1, 2, 6, 7]
    assert all(gap.projectors[str(s)].cls_token is None for s in gap.stages)
    assert cnn_projector_plan(16, 1, 3, 64, 256) == CNNProjectorPlan(
        ((16, 32), (32, 256)), None, 256)  # resnet8: 3 stages, so 3 - stage downsamplings
    merged = token_projector_plan((8, 8), 128, 1, 128, True, final_patch_grid=4)
    assert merged.merges == ((8, 128, 128, True),)
    hierarchical = token_projector_plan((8, 8), 96, 1, 768, False)
    assert hierarchical.merges == () and hierarchical.proj == (96, 768)


# ------------------------------------------------------------------------------ errors
def test_bad_params_give_one_line_errors(cnn_pair) -> None:
    student, teacher = cnn_pair
    ctx = context(student, teacher)
    with pytest.raises(MethodError, match=r"eps has 3 values but 3 stages need 4") as e1:
        ofa(ctx, eps=[1.0, 1.0, 1.0])
    with pytest.raises(MethodError, match=r"stages \[4\] out of range.*1\.\.3") as e2:
        ofa(ctx, stages=[1, 4])
    with pytest.raises(MethodError, match="no stage features") as e3:
        OFA(OFAParams(), context(TinyNet(4, 4, 0, K), TinyNet(6, 4, 1, K)))
    for e in (e1, e2, e3):
        assert "\n" not in str(e.value)
    for bad in ({"stages": [0, 1]}, {"stages": [1, 1]}, {"stages": []}, {"eps": 0.0},
                {"eps": [1.0, -1.0]}, {"eps": []}, {"temperature": 0.0}):
        with pytest.raises(ValidationError):
            OFAParams(**bad)
    with pytest.raises(ConfigError, match="method.params"):
        ofa(ctx, stage=[1])  # unknown key (the official flag is --ofa-stage; kdlab's: stages)


def test_params_defaults() -> None:
    p = OFAParams()
    assert (p.ce_weight, p.ofa_weight, p.kd_weight, p.stages, p.eps, p.temperature,
            p.label_smoothing, p.final_patch_grid) == (1.0, 1.0, 1.0, None, 1.0, 1.0, 0.0, 7)


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize(("student_arch", "teacher_arch"),
                         [("resnet8", "resnet14"), ("resnet8", "vit_tiny"),
                          ("vit_tiny", "resnet14"), ("vit_tiny", "vit_tiny")])
def test_one_training_step(student_arch: str, teacher_arch: str) -> None:
    torch.manual_seed(0)
    student = create_model(student_arch, num_classes=K)
    teacher = create_model(teacher_arch, num_classes=K)
    distiller, b = ofa(context(student, teacher)), batch(8)
    params = trainable_parameters(student, distiller)
    opt = torch.optim.SGD(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        out_t = teacher(b.images)
    terms = distiller(student(b.images), out_t, b, epoch=1)
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    moved = {id(p) for p, old in zip(params, before, strict=True) if not torch.equal(p, old)}
    assert {id(p) for p in distiller.parameters()} <= moved  # every projector parameter trained
    assert id(student.classifier.weight) in moved


@pytest.mark.e2e
def test_kdlab_distill_with_a_vit_student(tmp_path: Path) -> None:
    """``kdlab distill`` (synthetic data, one epoch): the projectors are saved with the run."""
    teacher = save_random_teacher(tmp_path / "t.pth", K)
    cfg = {"name": "ofa", "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                                   "synthetic": {"n_train": 16, "n_test": 16, "num_classes": K}},
           "student": {"arch": "vit_tiny"}, "teacher": {"arch": "resnet14",
                                                        "checkpoint": str(teacher)},
           "method": {"name": "ofa", "params": {"eps": 1.5}},
           "optim": {"epochs": 1, "milestones": [], "lr": 0.01},
           "runtime": {"threads": 1, "amp": "off"}}
    run = run_distill(tmp_path, cfg)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["train_terms"]) == {"ce", "ofa_stage1", "ofa_stage3", "ofa_stage4",
                                          "ofa_logits"}
    resolved = json.loads((run / "method.json").read_text())["logit"]["resolved"]
    assert resolved["stages"] == [1, 3, 4] and resolved["eps"] == [1.5] * 4
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert any("projectors.3.blocks.0" in k for k in ckpt["distiller"])
