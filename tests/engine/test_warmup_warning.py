"""A loss warm-up longer than the schedule is reported (issue 23: short-run traps)."""

from __future__ import annotations

import logging

import pytest
import torch

from kdlab.config import MethodConfig
from kdlab.engine.build import warn_long_warmups
from kdlab.methods import DistillContext, build_method
from kdlab.models import create_model


@pytest.fixture(scope="module")
def ctx() -> DistillContext:
    torch.manual_seed(0)
    return DistillContext.from_models(create_model("resnet8", num_classes=10),
                                      create_model("resnet14", num_classes=10).eval(),
                                      num_classes=10, train_labels=torch.arange(20) % 10,
                                      input_size=32)


def test_default_dkd_warmup_on_a_short_schedule(ctx: DistillContext,
                                                caplog: pytest.LogCaptureFixture) -> None:
    distiller = build_method(MethodConfig(name="dkd"), ctx)  # warmup_epochs 20
    with caplog.at_level(logging.WARNING):
        warnings = warn_long_warmups(distiller, epochs=10)
    assert len(warnings) == 1
    assert "method dkd: warmup_epochs 20 is longer than the 10-epoch schedule" in warnings[0]
    assert "method.params.warmup_epochs (e.g. 2)" in warnings[0]
    assert warnings[0] in caplog.text


def test_partners_are_checked_too(ctx: DistillContext) -> None:
    cfg = MethodConfig(name="dckd", partners=[{"name": "reviewkd"}])
    assert [w.split(":")[0] for w in warn_long_warmups(build_method(cfg, ctx), epochs=6)] == [
        "method dckd", "method reviewkd"]


@pytest.mark.parametrize(("name", "params", "epochs"), [
    ("dkd", {}, 20), ("dkd", {}, 240), ("dkd", {"warmup_epochs": 2}, 6), ("kd", {}, 1)])
def test_no_warning_when_the_warmup_fits(ctx: DistillContext, name: str, params: dict,
                                         epochs: int) -> None:
    cfg = MethodConfig(name=name, params=params)
    assert warn_long_warmups(build_method(cfg, ctx), epochs=epochs) == []
