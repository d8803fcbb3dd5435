"""The adapter on small modules that mimic torchvision's structure, and once on torchvision.

The torchvision test runs when ``import torchvision`` works (e.g. ``PYTHONPATH=/tmp/tv``); for
a torchvision wheel built for another torch, the two operator schemas it registers fake kernels
for (``torchvision::nms`` and ``torchvision::qnms``) are defined first.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.core.errors import ModelError
from kdlab.losses import multiscale_logits
from kdlab.models.adapter import adapt
from kdlab.models.registry import create_model


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class MiniResNet(nn.Module):
    """torchvision ResNet attribute names: conv1, bn1, relu, maxpool, layer1..4, avgpool, fc."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(_Block(8, 8, 1))
        self.layer2 = nn.Sequential(_Block(8, 16, 2))
        self.layer3 = nn.Sequential(_Block(16, 16, 2))
        self.layer4 = nn.Sequential(_Block(16, 32, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MiniMobileNet(nn.Module):
    """torchvision MobileNetV2/EfficientNet names: features, classifier = [Dropout, Linear]."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _Block(3, 8, 2), _Block(8, 8, 1), _Block(8, 16, 2), _Block(16, 24, 2), _Block(24, 32, 1)
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d (channels-first LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MiniConvNeXt(nn.Module):
    """ConvNeXt-like: features, avgpool, classifier = [LayerNorm2d, Flatten, Linear]."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.features = nn.Sequential(_Block(3, 8, 4), _Block(8, 16, 2), _Block(16, 32, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(32), nn.Flatten(1), nn.Linear(32, num_classes))
        nn.init.normal_(self.classifier[0].weight, 1.0, 0.3)
        nn.init.normal_(self.classifier[0].bias, 0.0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


class MiniTimm(nn.Module):
    """timm API: forward_features, forward_head, get_classifier, feature_info."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.stem = _Block(3, 8, 2)
        self.stages = nn.Sequential(_Block(8, 16, 2), _Block(16, 32, 2))
        self.fc = nn.Linear(32, num_classes)
        self.feature_info = [
            {"num_chs": 8, "reduction": 2, "module": "stem"},
            {"num_chs": 16, "reduction": 4, "module": "stages.0"},
            {"num_chs": 32, "reduction": 8, "module": "stages.1"},
        ]

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize(
    ("cls", "preset", "n_features"),
    [(MiniResNet, "resnet", 5), (MiniMobileNet, "features", 3), (MiniConvNeXt, "features", 3),
     (MiniTimm, "timm", 3)],
)  # fmt: skip
def test_adapter_matches_model(cls: type[nn.Module], preset: str, n_features: int) -> None:
    torch.manual_seed(0)
    net = cls().eval()
    wrapped = adapt(net)
    assert wrapped.preset == preset and wrapped.num_classes == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
        out = wrapped(x)
    assert torch.equal(out.logits, ref)
    assert out.feature_map.shape == (2, 32, out.feature_map.shape[2], out.feature_map.shape[3])
    assert out.embedding is not None and out.embedding.shape == (2, 32)
    torch.testing.assert_close(wrapped.classifier(out.embedding), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.embedding, out.feature_map.mean((2, 3)), rtol=0, atol=1e-6)
    assert len(out.features) == n_features and out.features[-1].shape == out.feature_map.shape
    # the direct SDD region 0 is the model's own logits
    local = multiscale_logits(out.feature_map, wrapped.classifier, (1, 2), "direct")
    torch.testing.assert_close(local[:, :, 0], ref, rtol=1e-5, atol=1e-5)
    # state dict is the wrapped model's, under "model.", without duplicates
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in net.state_dict()}


def test_adapter_resnet_stages_and_explicit_paths() -> None:
    net = MiniResNet().eval()
    with torch.no_grad():
        out = adapt(net)(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in out.features] == [
        (8, 16, 16), (8, 16, 16), (16, 8, 8), (16, 4, 4), (32, 2, 2)
    ]  # fmt: skip
    explicit = adapt(net, classifier="fc", feature_layers=["layer2", "layer3", "layer4"])
    assert explicit.preset == "explicit" and explicit.classifier is net.fc
    with torch.no_grad():
        assert len(explicit(torch.randn(1, 3, 64, 64)).features) == 3


def test_adapter_errors() -> None:
    with pytest.raises(ModelError, match="cannot recognise"):
        adapt(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3)))
    mlp = MiniMobileNet()
    mlp.classifier = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 7))
    with pytest.raises(ModelError, match="MLP head"):
        adapt(mlp)
    with pytest.raises(ModelError, match="no submodule"):
        adapt(MiniResNet(), classifier="head", feature_map="layer4")


_TV_LIB = None


def _torchvision():  # noqa: ANN202
    global _TV_LIB
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:  # a wheel built for another torch: define the two missing schemas
        if "torchvision::" not in str(e):
            raise
        import sys

        for mod in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[mod]
        _TV_LIB = torch.library.Library("torchvision", "DEF")
        _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except ImportError:
        return None
    try:
        import torchvision.models as tvm
    except (ImportError, RuntimeError):
        return None
    return tvm


def test_torchvision_weights_give_identical_logits() -> None:
    tvm = _torchvision()
    if tvm is None:
        pytest.skip("torchvision is not importable")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    for ctor, name in [(tvm.resnet18, "resnet18_imagenet"), (tvm.resnet34, "resnet34_imagenet"),
                       (tvm.resnet50, "resnet50_imagenet"),
                       (tvm.mobilenet_v2, "MobileNetV2_imagenet")]:  # fmt: skip
        ref = ctor().eval()
        for m in ref.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        ours = create_model(name, num_classes=1000).eval()
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(ours(x).logits, ref(x)), name
            assert torch.equal(adapt(ref)(x).logits, ref(x))
