"""Every method works on outputs produced under bf16 autocast (the trainer's fast path).

The trainer runs the models under autocast and the distiller outside it, so losses are true
float32; helper layers (SDD's classifier on pooled cells, FitNet's regressor, ReviewKD's fusion)
must accept the bf16 features. Regression test for a dtype mismatch found in the demo.
"""

from __future__ import annotations

import pytest
import torch

from kdlab.config import MethodConfig
from kdlab.methods import Batch, DistillContext, build_method, get_method, list_methods
from kdlab.models import create_model
from support import student_arch_for


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = create_model("resnet14", num_classes=10).eval()
    student = create_model("resnet8", num_classes=10)
    ctx = DistillContext.from_models(student, teacher, num_classes=10,
                                     train_labels=torch.arange(64) % 10, input_size=32)
    return teacher, student, ctx


@pytest.mark.filterwarnings("ignore:crd")
@pytest.mark.parametrize("name", [n for n in list_methods()
                                  if not get_method(n).needs_dense_maps])
def test_method_under_bf16_autocast(setup, name: str) -> None:
    teacher, student, ctx = setup
    if student_arch_for(name, "resnet8") != "resnet8":
        student = create_model(student_arch_for(name, "resnet8"), num_classes=10)
        ctx = DistillContext.from_models(student, teacher, num_classes=10,
                                         train_labels=torch.arange(64) % 10, input_size=32)
    distiller = build_method(MethodConfig(name=name), ctx)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            out_t = teacher(x)
        out_s = student(x)
    assert out_s.feature_map.dtype == torch.bfloat16 or student.token_grid
    terms = distiller(out_s, out_t, Batch(x, y, torch.arange(8)), epoch=30)
    for key, value in terms.items():
        assert value.dtype == torch.float32, key
        assert torch.isfinite(value), key
    student.zero_grad()
    sum(terms.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_only_vanilla_runs_without_the_teacher(setup) -> None:
    _, _, ctx = setup
    assert not build_method(MethodConfig(name="vanilla"), ctx).uses_teacher
    assert build_method(MethodConfig(name="kd"), ctx).uses_teacher
    # a partner alone is vanilla + partner: the partner needs the teacher
    assert build_method(MethodConfig(name="at"), ctx).uses_teacher
