"""torchvision and timm classifiers from a config: ``arch: "torchvision:NAME"`` / ``"timm:NAME"``.

torchvision and timm are optional and not installed in CI, so most tests register small fake
``torchvision`` / ``timm`` modules in ``sys.modules`` that expose the same entry points kdlab
calls (``torchvision.models.get_model``, ``list_models``, ``get_model_weights``;
``timm.create_model``, ``is_model``, ``list_models``, ``timm.models.load_pretrained``) and build
a tiny torchvision-style ResNet (torchvision's attribute names and forward) or a timm-style net
(``forward_features``/``forward_head``/``get_classifier``/``feature_info``). The last test uses
the real packages when they import.
"""

from __future__ import annotations

import sys
import types
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdlab
from kdlab.cli.main import main
from kdlab.config import validate_config
from kdlab.core.errors import ConfigError, ModelError
from kdlab.engine.build import build_model
from kdlab.models import create_model, load_pretrained
from kdlab.models.adapter import AdaptedModel
from kdlab.tasks import get_task


# --------------------------------------------------------------------------- fake libraries
class Block(nn.Module):
    """torchvision's BasicBlock (names and forward)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                           else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """torchvision.models.ResNet's structure at a toy size."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(Block(8, 8, 1))
        self.layer2 = nn.Sequential(Block(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MlpHeadNet(nn.Module):
    """features + an MLP classifier (MobileNetV3-like): not a single linear head."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TinyTimmNet(nn.Module):
    """timm's classifier interface at a toy size."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, 2, 1)
        self.act = nn.ReLU()
        self.stage = nn.Conv2d(8, 16, 3, 2, 1)
        self.fc = nn.Linear(16, num_classes)
        self.feature_info = [{"module": "act", "num_chs": 8}, {"module": "stage", "num_chs": 16}]
        self.pretrained_cfg = {"hf_hub_id": "timm/tiny_timm.test"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.act(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


WEIGHTS_URL = "https://download.example.org/models/tiny_resnet-0123abcd.pth"


def published_weights() -> dict[str, torch.Tensor]:
    """The fake library's "ImageNet" weights (1000 classes), always the same."""
    torch.manual_seed(123)
    return TinyResNet(1000).state_dict()


class FakeLibraries:
    """Installs fake torchvision and timm modules; records every call kdlab makes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.fetch_error: Exception | None = None
        tv = types.ModuleType("torchvision")
        models = types.ModuleType("torchvision.models")
        builders = {"tiny_resnet": TinyResNet, "tiny_mlp_head": MlpHeadNet}
        lib = self

        def get_model(name: str, **kwargs: Any) -> nn.Module:
            lib.calls.append(("get_model", name, dict(kwargs)))
            if name not in builders:
                raise ValueError(f"Unknown model {name}")
            assert kwargs.pop("weights") is None
            return builders[name](**kwargs)

        class Weights:
            url = WEIGHTS_URL

            def get_state_dict(self, progress: bool = True) -> dict[str, torch.Tensor]:
                lib.calls.append(("get_state_dict", "tiny_resnet", {"progress": progress}))
                if lib.fetch_error is not None:
                    raise lib.fetch_error
                return published_weights()

        models.get_model = get_model  # type: ignore[attr-defined]
        models.list_models = lambda module=None: sorted(builders)  # type: ignore[attr-defined]
        models.get_model_weights = (  # type: ignore[attr-defined]
            lambda name: types.SimpleNamespace(DEFAULT=Weights()))
        tv.models = models  # type: ignore[attr-defined]

        timm = types.ModuleType("timm")
        timm_models = types.ModuleType("timm.models")

        def create_model(name: str, **kwargs: Any) -> nn.Module:
            lib.calls.append(("create_model", name, kwargs))
            return TinyTimmNet(num_classes=kwargs["num_classes"], in_chans=kwargs["in_chans"])

        def load_pretrained(model: nn.Module, **kwargs: Any) -> None:
            lib.calls.append(("load_pretrained", type(model).__name__, kwargs))
            if lib.fetch_error is not None:
                raise lib.fetch_error
            with torch.no_grad():
                model.stem.weight.fill_(0.5)

        timm.create_model = create_model  # type: ignore[attr-defined]
        timm.is_model = lambda name: name == "tiny_timm"  # type: ignore[attr-defined]
        timm.list_models = lambda: ["tiny_timm"]  # type: ignore[attr-defined]
        timm_models.load_pretrained = load_pretrained  # type: ignore[attr-defined]
        timm.models = timm_models  # type: ignore[attr-defined]
        for name, module in (("torchvision", tv), ("torchvision.models", models),
                             ("timm", timm), ("timm.models", timm_models)):
            monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLibraries:
    return FakeLibraries(monkeypatch)


def images(channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert text and "\n" not in text
    return text


# --------------------------------------------------------------------------- building
def test_torchvision_arch_is_get_model_wrapped_by_adapt(fake: FakeLibraries) -> None:
    torch.manual_seed(0)
    model = create_model("torchvision:tiny_resnet", num_classes=7)
    assert fake.calls == [("get_model", "tiny_resnet", {"weights": None, "num_classes": 7})]
    assert isinstance(model, AdaptedModel) and model.preset == "resnet"
    assert (model.arch, model.num_classes, model.in_channels) == ("torchvision:tiny_resnet", 7, 3)
    torch.manual_seed(0)
    direct = TinyResNet(num_classes=7)  # what torchvision's get_model builds, same seed
    assert model.state_dict().keys() == {f"model.{k}" for k in direct.state_dict()}
    assert all(torch.equal(model.state_dict()[f"model.{k}"], v)
               for k, v in direct.state_dict().items())
    model.eval()
    out = model(images())
    assert torch.equal(out.logits, model.model(images()))
    assert torch.equal(model.classifier(out.embedding), out.logits)
    assert out.feature_map.shape == (2, 16, 4, 4) and len(out.features) == 3


def test_timm_arch_is_create_model_with_classes_and_channels(fake: FakeLibraries) -> None:
    model = create_model("timm:tiny_timm", num_classes=5, in_channels=1)
    assert fake.calls == [("create_model", "tiny_timm",
                           {"pretrained": False, "num_classes": 5, "in_chans": 1})]
    assert isinstance(model, AdaptedModel) and model.preset == "timm"
    out = model.eval()(images(channels=1))
    assert torch.equal(out.logits, model.model(images(channels=1)))
    assert torch.equal(model.classifier(out.embedding), out.logits)
    assert [f.shape[1] for f in out.features] == [8, 16]


def test_bad_names_and_models_are_one_line_model_errors(fake: FakeLibraries) -> None:
    with pytest.raises(ModelError) as e:
        create_model("torchvision:tiny_resnt", 10)
    assert one_line(e) == ("unknown torchvision classifier 'tiny_resnt'; did you mean "
                           "tiny_resnet?")
    with pytest.raises(ModelError) as e:
        create_model("timm:tiny_tim", 10)
    assert "did you mean tiny_timm?" in one_line(e)
    with pytest.raises(ModelError) as e:
        create_model("torchvision:", 10)
    assert one_line(e) == "arch 'torchvision:' names no model; write torchvision:MODEL_NAME"
    with pytest.raises(ModelError) as e:
        create_model("torchvision:tiny_resnet", 10, in_channels=1)
    assert "use timm:tiny_resnet" in one_line(e)
    with pytest.raises(ModelError) as e:
        create_model("torchvision:tiny_mlp_head", 10)
    assert "MLP head" in one_line(e) and "plugin" in one_line(e)
    with pytest.raises(ModelError, match="unknown model 'tiny:x'"):
        create_model("tiny:x", 10)  # not a library prefix: a zoo name


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_a_missing_package_is_one_line_naming_the_install(
        library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # what an uninstalled package looks like (its submodules too: other tests may have
    # imported the real torchvision.models into this process)
    monkeypatch.setitem(sys.modules, library, None)
    monkeypatch.setitem(sys.modules, f"{library}.models", None)
    with pytest.raises(ModelError) as e:
        create_model(f"{library}:resnet18", 10)
    assert one_line(e) == (f"arch '{library}:resnet18' needs the {library} package: pip install "
                           f"{library} (the build that matches your torch {torch.__version__})")


def test_a_broken_install_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision built for another torch fails at import (on this machine: its C++ ops)."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    for name in ("torchvision", "torchvision.models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError) as e:
        create_model("torchvision:resnet18", 10)
    assert one_line(e).startswith("arch 'torchvision:resnet18': torchvision ")
    assert (f"'s compiled operators do not load with torch {torch.__version__} (operator "
            "torchvision::nms does not exist): install the torchvision build made for this "
            ) in one_line(e)
    assert "pip install --no-deps torchvision" in one_line(e)


# --------------------------------------------------------------------------- pretrained
def test_torchvision_pretrained_loads_all_but_a_head_of_another_size(
        fake: FakeLibraries) -> None:
    published = published_weights()
    model = create_model("torchvision:tiny_resnet", num_classes=7)
    head = model.model.fc.weight.detach().clone()
    load_pretrained(model)
    own = model.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in published.items() if not k.startswith("fc."))
    assert torch.equal(own["fc.weight"], head)  # a new 7-class head, as initialised
    full = create_model("torchvision:tiny_resnet", num_classes=1000)
    load_pretrained(full)
    reference = TinyResNet(1000)
    reference.load_state_dict(published)
    assert torch.equal(full.eval()(images()).logits, reference.eval()(images()))


def test_pretrained_without_network_says_where_to_put_the_file(fake: FakeLibraries) -> None:
    fake.fetch_error = urllib.error.URLError("[Errno -2] Name or service not known")
    with pytest.raises(ModelError) as e:
        load_pretrained(create_model("torchvision:tiny_resnet", num_classes=7))
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    assert one_line(e) == (
        "cannot get the pretrained weights of torchvision:tiny_resnet (<urlopen error [Errno -2] "
        f"Name or service not known>); without network, put tiny_resnet-0123abcd.pth (from "
        f"{WEIGHTS_URL}) into {folder}")
    timm_model = create_model("timm:tiny_timm", num_classes=7)
    with pytest.raises(ModelError) as e:
        load_pretrained(timm_model)
    assert "timm/tiny_timm.test" in one_line(e)
    with pytest.raises(ModelError, match="only for torchvision:/timm: archs"):
        load_pretrained(create_model("resnet8", num_classes=7))


def test_timm_pretrained_goes_through_timms_loader(fake: FakeLibraries) -> None:
    model = create_model("timm:tiny_timm", num_classes=5, in_channels=1)
    load_pretrained(model)
    assert fake.calls[-1] == ("load_pretrained", "TinyTimmNet", {"num_classes": 5, "in_chans": 1})
    assert bool((model.model.stem.weight == 0.5).all())


def test_pretrained_config_key(fake: FakeLibraries) -> None:
    base = {"data": {"name": "synthetic"}, "student": {"arch": "torchvision:tiny_resnet"}}
    assert validate_config(base).student.pretrained is False
    plain = validate_config(base).fingerprint()
    assert validate_config({**base, "student": {"arch": "torchvision:tiny_resnet",
                                                "pretrained": False}}).fingerprint() == plain
    with pytest.raises(ConfigError) as e:
        validate_config({**base, "student": {"arch": "resnet8", "pretrained": True}})
    assert "pretrained: true needs a torchvision:NAME or timm:NAME arch" in one_line(e)
    with pytest.raises(ConfigError) as e:
        validate_config({**base, "student": {"arch": "timm:tiny_timm", "pretrained": True,
                                             "checkpoint": "x.pt"}})
    assert "either pretrained: true or a checkpoint" in one_line(e)
    cfg = validate_config({**base, "student": {"arch": "torchvision:tiny_resnet",
                                               "pretrained": True}})
    data = types.SimpleNamespace(num_classes=7, in_channels=3)
    model = build_model(get_task("classification"), cfg.student, data, torch.device("cpu"))
    assert torch.equal(model.model.conv1.weight, published_weights()["conv1.weight"])


# --------------------------------------------------------------------------- whole runs
@pytest.mark.e2e
def test_a_run_with_a_torchvision_student_trains_resumes_evaluates_and_loads(
        fake: FakeLibraries, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {
        "name": "tv",
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "synthetic": {"n_train": 16, "n_test": 16, "num_classes": 10, "size": 16}},
        "student": {"arch": "torchvision:tiny_resnet"},
        "optim": {"epochs": 2, "milestones": [], "lr": 0.05},
        "runtime": {"threads": 2, "amp": "off"},
    }
    run_dir = tmp_path / "run"
    kdlab.run(config, run_dir=run_dir, stop_after=1)
    summary = kdlab.run(config, run_dir=run_dir, resume=True)
    assert summary["epochs"] == 2 and summary["student"] == "torchvision:tiny_resnet"
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert ckpt["arch"] == "torchvision:tiny_resnet" and ckpt["num_classes"] == 10
    student = kdlab.load_student(run_dir)
    reference = TinyResNet(num_classes=10)
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    reference.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    with torch.no_grad():
        assert torch.equal(student(images()).logits, reference.eval()(images()))
    assert main(["-q", "eval", str(run_dir)]) == 0
    assert f"top-1 {summary['best_top1']:.2f}" in capsys.readouterr().out


# --------------------------------------------------------------------------- real packages
def _real(library: str) -> types.ModuleType:
    try:
        return __import__(library)
    except Exception as e:  # not installed, or a build for another torch
        pytest.skip(f"{library} is not importable here ({type(e).__name__})")


@pytest.mark.parametrize("library,name", [("torchvision", "resnet18"), ("timm", "resnet18")])
def test_real_library_model_is_wrapped_unchanged(library: str, name: str) -> None:
    _real(library)
    model = create_model(f"{library}:{name}", num_classes=10).eval()
    with torch.no_grad():
        out = model(images(size=32))
        assert torch.equal(out.logits, model.model(images(size=32)))
        assert torch.allclose(model.classifier(out.embedding), out.logits, atol=1e-6)
