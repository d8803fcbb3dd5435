"""ImageNet MobileNets: the DKD/SDD MobileNetV1 student and torchvision's MobileNetV2.

* ``MobileNetV1_imagenet``: Howard et al., "MobileNets: Efficient Convolutional Neural Networks
  for Mobile Vision Applications" (arXiv 1704.04861): a 3x3/2 stem and 13 depthwise-separable
  blocks ending in a 1024-d head. Parameter names follow mdistiller's
  ``mdistiller/models/imagenet/mobilenetv1.py`` (``model.<i>.<j>``, head ``fc``), the student of
  ResNet50 -> MobileNetV1 in DKD (Zhao et al., CVPR 2022) and SDD (Wei et al., CVPR 2024), so
  mdistiller checkpoints load unchanged.
* ``MobileNetV2_imagenet``: Sandler et al., "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks" (CVPR 2018), width 1.0, with ``torchvision.models.mobilenet_v2``'s names
  (``features.<i>...``, head ``classifier.1``) and initialisation.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.models.cifar._common import AliasedHeadModel, global_avg_pool
from kdlab.models.output import ModelOutput
from kdlab.models.registry import register_model

__all__ = ["MobileNetV1", "MobileNetV2", "mobilenet_v1", "mobilenet_v2"]


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU()
    )


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


_V1_CFG: tuple[tuple[int, int, int], ...] = (
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
    (1024, 1024, 1),
)  # fmt: skip

# (first, last) indices into ``model`` of each stage, as mdistiller's feature taps.
_V1_STAGES: tuple[tuple[int, int], ...] = ((1, 3), (4, 5), (6, 11), (12, 13))


class MobileNetV1(AliasedHeadModel):
    """MobileNetV1 (width 1.0) with mdistiller's layer names: ``model.0`` the 3x3/2 conv-BN-ReLU
    stem, ``model.1`` ... ``model.13`` the depthwise-separable blocks, ``model.14`` the pooling,
    ``fc`` the 1024 -> ``num_classes`` head.

    ``features`` are ``[stem, model[3], model[5], model[11], model[13]]`` outputs (128@56,
    256@28, 512@14, 1024@7 at 224 px; mdistiller's four taps plus the stem) after their ReLU,
    ``preact_features`` the same before the last ReLU (mdistiller's ``preact_feats``);
    ``feature_map`` is ``model[13]``'s output. mdistiller pools with ``AvgPool2d(7)``; global
    average pooling is the same at 224 px and works at any input size.
    """

    _head_path = "fc"

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        layers: list[nn.Module] = [_conv_bn(in_channels, 32, 2)]
        layers += [_conv_dw(i, o, s) for i, o, s in _V1_CFG]
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> ModelOutput:
        f0 = self.model[0](x)
        out = f0
        features, preact = [f0], [f0]
        for first, last in _V1_STAGES:
            for i in range(first, last):
                out = self.model[i](out)
            pre = self.model[last][:-1](out)
            out = F.relu(pre)
            features.append(out)
            preact.append(pre)
        embedding = global_avg_pool(out)
        return ModelOutput(
            logits=self.fc(embedding),
            feature_map=out,
            features=features,
            embedding=embedding,
            preact_features=preact,
        )


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding (from the TensorFlow MobileNet code)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_norm_act(
    inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation`` with BN and ReLU6 (same state-dict names)."""
    padding = (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``: expand 1x1, depthwise 3x3, linear 1x1 projection."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_norm_act(inp, hidden, kernel=1))
        layers += [
            _conv_norm_act(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    (6, 320, 1, 1),
)  # fmt: skip

# Ends (exclusive) of the stages in ``features``: stem | 24@56 | 32@28 | 96@14 | 320@7 | last conv.
_V2_CUTS: tuple[int, ...] = (1, 4, 7, 14, 18)


class MobileNetV2(AliasedHeadModel):
    """torchvision's MobileNetV2 (``features.0`` ... ``features.18``, ``classifier.1``).

    Args:
        num_classes: size of the head ``classifier.1`` (``model.classifier`` returns it).
        in_channels: input channels of the stem.
        width_mult: channel multiplier (1.0 is the ImageNet model).
        dropout: dropout before the head (torchvision: 0.2). In training mode
            ``logits == classifier(dropout(embedding))``; in eval mode ``classifier(embedding)``.

    ``features`` are ``[features[0], features[3], features[6], features[13], features[17]]``
    outputs (32@112, 24@56, 32@28, 96@14, 320@7 at 224 px; the blocks end in a linear
    projection, so ``preact_features`` is the same list); ``feature_map`` is the ReLU6 output of
    ``features[18]`` (``1280 x 7 x 7``).
    """

    _head_path = "classifier.1"

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        channels = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_norm_act(in_channels, channels, stride=2)]
        for t, c, n, s in _V2_SETTINGS:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(_conv_norm_act(channels, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.add_module(
            "classifier", nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> ModelOutput:
        feats: list[Tensor] = []
        start = 0
        for stop in _V2_CUTS:
            x = self.features[start:stop](x)
            feats.append(x)
            start = stop
        feature_map = self.features[start:](x)
        embedding = global_avg_pool(feature_map)
        head: nn.Sequential = self._modules["classifier"]  # type: ignore[assignment]
        return ModelOutput(
            logits=head(embedding),
            feature_map=feature_map,
            features=feats,
            embedding=embedding,
            preact_features=list(feats),
        )


@register_model("MobileNetV1_imagenet")
def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV1:
    """MobileNetV1 (1024-d head, mdistiller names), the ImageNet student of R50 -> MobileNetV1."""
    return MobileNetV1(num_classes, in_channels)


@register_model("MobileNetV2_imagenet")
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 width 1.0 (torchvision ``mobilenet_v2`` names)."""
    return MobileNetV2(num_classes, in_channels)
