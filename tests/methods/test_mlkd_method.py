"""The ``mlkd`` method (Jin, Wang, Lin, CVPR 2023) and its two-view plumbing: params, terms, the
views a method asks for, the task's separate forward passes, ``kdlab distill`` end to end and a
bit-exact resume from the middle of an epoch."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError

from kdlab.cli.main import main
from kdlab.config import MethodConfig
from kdlab.core.errors import ConfigError
from kdlab.data import DeviceLoader, make_synthetic_dataset
from kdlab.data.batch import Batch
from kdlab.data.build import request_views
from kdlab.data.randaugment import StrongViewLoader
from kdlab.engine import trainer as trainer_module
from kdlab.losses.mlkd import mlkd_loss
from kdlab.methods import DistillContext, build_method
from kdlab.methods.base import requested_views
from kdlab.methods.mlkd import MLKDParams
from kdlab.models import create_model
from kdlab.tasks.classification.task import ClassificationTask
from support import assert_same

K = 10


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    teacher = create_model("resnet14", num_classes=K).eval()
    student = create_model("resnet8", num_classes=K)
    ctx = DistillContext.from_models(student, teacher, num_classes=K,
                                     train_labels=torch.arange(40) % K, input_size=32)
    return teacher, student, ctx


def two_view_batch(b: int = 4) -> Batch:
    g = torch.Generator().manual_seed(1)
    x, strong = torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)
    return Batch(x, torch.randint(0, K, (b,), generator=g), torch.arange(b)).with_strong(strong)


def test_params_defaults_and_validation() -> None:
    p = MLKDParams()
    assert (p.ce_weight, p.kd_weight, p.temperatures, p.code_exact,
            p.logit_standardization) == (0.1, 0.9, [4.0, 3.0, 5.0, 2.0, 6.0], False, False)
    with pytest.raises(ValidationError, match="5 temperatures"):
        MLKDParams(code_exact=True, temperatures=[4.0, 3.0])
    with pytest.raises(ValidationError):
        MLKDParams(temperatures=[4.0, -1.0])
    with pytest.raises(ValidationError):
        MLKDParams(temperatures=[])
    assert MLKDParams(temperatures=[2.0]).temperatures == [2.0]


def test_the_task_runs_each_model_on_each_view_separately(models) -> None:
    """Separate calls (the official code's): each view's BatchNorm statistics are its own, which
    one concatenated call would not give."""
    teacher, student, _ = models
    batch = two_view_batch()
    task = ClassificationTask()
    out_s, out_t = task.forward(student, teacher, batch)
    assert set(out_s.views) == set(out_t.views) == {"strong"}
    separate = student(batch.strong).logits
    torch.testing.assert_close(out_s.views["strong"].logits, separate, rtol=0, atol=0)
    joint = student(torch.cat([batch.images, batch.strong])).logits[4:]
    assert not torch.allclose(joint, separate)
    assert out_s.views["strong"].logits.requires_grad
    assert not out_t.views["strong"].logits.requires_grad
    torch.testing.assert_close(out_t.views["strong"].logits, teacher(batch.strong).logits)
    plain_s, _ = task.forward(student, teacher, Batch(*batch))  # no strong view: one pass each
    assert plain_s.views == {} and out_s.detach().views["strong"].logits.requires_grad is False


def test_terms_are_the_weighted_losses(models) -> None:
    teacher, student, ctx = models
    batch = two_view_batch()
    params = {"ce_weight": 0.3, "kd_weight": 2.0, "logit_standardization": True}
    distiller = build_method(MethodConfig(name="mlkd", params=params), ctx)
    out_s, out_t = ClassificationTask().forward(student, teacher, batch)
    terms = distiller(out_s, out_t, batch, epoch=1)
    assert set(terms) == {"ce", "kd", "cc", "bc"}
    zs, zs2 = out_s.logits, out_s.views["strong"].logits
    ce = F.cross_entropy(zs, batch.labels) + F.cross_entropy(zs2, batch.labels)
    torch.testing.assert_close(terms["ce"], 0.3 * ce)
    ref = mlkd_loss(zs, out_t.logits, zs2, out_t.views["strong"].logits,
                    logit_standardization=True)
    for key in ("kd", "cc", "bc"):
        torch.testing.assert_close(terms[key], 2.0 * ref[key])
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_without_a_strong_view_the_weak_view_stands_in(models, caplog) -> None:
    teacher, student, ctx = models
    batch = two_view_batch()
    distiller = build_method(MethodConfig(name="mlkd"), ctx)
    with torch.no_grad():
        out_s, out_t = student(batch.images), teacher(batch.images)
        with caplog.at_level(logging.WARNING, logger="kdlab.methods.mlkd"):
            alone = distiller(out_s, out_t, Batch(*batch), 1)
        out_s.views["strong"], out_t.views["strong"] = out_s, out_t
        both = distiller(out_s, out_t, batch, 1)
    assert "no strong view" in caplog.text
    for key in both:
        torch.testing.assert_close(alone[key], both[key])


def test_requested_views_of_methods_and_compositions(models) -> None:
    *_, ctx = models
    assert requested_views(build_method(MethodConfig(name="kd"), ctx)) == ("weak",)
    composite = build_method(MethodConfig(name="mlkd", partners=[{"name": "at"}]), ctx)
    assert requested_views(composite) == ("weak", "strong")


def test_request_views_on_each_kind_of_loader() -> None:
    ds = make_synthetic_dataset(16, num_classes=4, size=8)
    dev = DeviceLoader(ds, batch_size=8, train=True)
    assert request_views(dev, ("weak",), seed=0) is dev and not dev.strong_view
    assert request_views(dev, ("weak", "strong"), seed=0) is dev and dev.strong_view
    other = DeviceLoader(ds, batch_size=8, train=True)

    class Streamed:  # any loader that is not device-resident: wrapped
        dataset = ds

        def __len__(self) -> int:
            return len(other)

    wrapped = request_views(Streamed(), ("weak", "strong"), seed=0)
    assert isinstance(wrapped, StrongViewLoader) and wrapped.mean == ds.mean
    with pytest.raises(ConfigError, match="blurred"):
        request_views(dev, ("weak", "blurred"), seed=0)


# ----------------------------------------------------------------------------- end to end
def write_config(tmp_path: Path, teacher_ckpt: Path, epochs: int, params: dict) -> Path:
    cfg = {
        "name": "mlkd-e2e",
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "synthetic": {"n_train": 32, "n_test": 16, "num_classes": K}},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet14", "checkpoint": str(teacher_ckpt)},
        "method": {"name": "mlkd", "params": params},
        "optim": {"epochs": epochs, "milestones": [2], "lr": 0.05},
        "runtime": {"threads": 1, "amp": "off", "deterministic": True},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlkd_teacher") / "resnet14.pth"
    state = torch.get_rng_state()
    torch.manual_seed(3)
    torch.save({"model": create_model("resnet14", num_classes=K).state_dict()}, path)
    torch.set_rng_state(state)
    return path


def run(argv: list[str]) -> int:
    return main(["-q", *argv, "--no-progress"])


@pytest.mark.e2e
def test_distill_mlkd_end_to_end(tmp_path: Path, teacher_ckpt: Path, monkeypatch) -> None:
    import kdlab.methods.mlkd as mlkd_module

    seen: list[bool] = []
    real = mlkd_module.mlkd_loss

    def spy(zs, zt, zs2, zt2, *args, **kwargs):
        seen.append(zs2 is not zs and not torch.equal(zs2, zs))
        return real(zs, zt, zs2, zt2, *args, **kwargs)

    monkeypatch.setattr(mlkd_module, "mlkd_loss", spy)
    cfg = write_config(tmp_path, teacher_ckpt, 1, {"code_exact": True})
    assert run(["distill", str(cfg), "--run-dir", str(tmp_path / "run")]) == 0
    assert seen == [True] * 4  # 4 steps, each with a real strong view
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["train_terms"]) == {"ce", "kd", "cc", "bc"}
    assert all(map(torch.isfinite, torch.tensor(list(record["train_terms"].values()))))
    method = json.loads((tmp_path / "run" / "method.json").read_text())
    assert method["logit"]["params"]["code_exact"] is True


@pytest.mark.e2e
def test_mid_epoch_resume_is_bit_exact(tmp_path: Path, teacher_ckpt: Path,
                                       monkeypatch) -> None:
    cfg = write_config(tmp_path, teacher_ckpt, 2, {})
    assert run(["distill", str(cfg), "--run-dir", str(tmp_path / "full")]) == 0

    calls = {"n": 0}
    real_step = trainer_module.Trainer.backward_step

    def stop_after_six(self, *args, **kwargs):  # SIGTERM during epoch 2, step 2 (of 4)
        real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:
            self._stop_signal = signal.SIGTERM

    part = tmp_path / "part"
    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "backward_step", stop_after_six)
        assert run(["distill", str(cfg), "--run-dir", str(part),
                    "--set", "runtime.checkpoint_every_steps=1000000"]) != 0
    step = torch.load(part / "checkpoints" / "step.pt", weights_only=True)
    assert (step["mid_epoch"]["epoch"], step["mid_epoch"]["step"]) == (2, 2)
    assert run(["distill", str(cfg), "--run-dir", str(part), "--resume"]) == 0
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "rng"):
        assert_same(a[key], b[key], key)
    strip = ("train_img_per_s", "train_time_s", "eval_time_s")
    ma, mb = ([{k: v for k, v in json.loads(x).items() if k not in strip}
               for x in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (tmp_path / "full", part))
    assert ma == mb

