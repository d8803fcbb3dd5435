"""ResNet18 / ResNet34 / ResNet50 for 32x32 inputs (the CRD "resnetv2" family).

The four-stage ImageNet ResNet of He et al., "Deep Residual Learning for Image Recognition"
(CVPR 2016) with the CIFAR stem (one 3x3 stride-1 convolution, no max-pool). Module names, layer
order and activations follow the CRD / mdistiller ``resnetv2`` definitions, so their published
checkpoints load unchanged and give identical logits.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.models.cifar._common import AliasedHeadModel, staged_output
from kdlab.models.output import ModelOutput
from kdlab.models.registry import register_model


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (an empty ``Sequential``) or a strided 1x1 conv + BN projection."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut; returns ``(relu(y), y)`` for the residual sum ``y``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(pre), pre


class Bottleneck(nn.Module):
    """1x1 / 3x3 / 1x1 conv-BN bottleneck (4x expansion); returns ``(relu(y), y)``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        pre = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(pre), pre


class ResNetV2(AliasedHeadModel):
    """Four-stage ResNet (64/128/256/512 planes) with a 3x3 stride-1 stem and head ``linear``.

    ``features`` are ``[stem, stage1, ..., stage4]`` after their ReLU, ``preact_features`` the
    same before the last block's final ReLU; ``feature_map`` is the stage-4 output
    (``512 * expansion x 4 x 4`` for 32x32 inputs).
    """

    _head_path = "linear"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self._in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, n: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self._in_planes, planes, s))
            self._in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> ModelOutput:
        f0 = F.relu(self.bn1(self.conv1(x)))
        return staged_output(f0, [self.layer1, self.layer2, self.layer3, self.layer4], self.linear)


@register_model("ResNet18")
def resnet18(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    """ResNet-18: basic blocks (2, 2, 2, 2)."""
    return ResNetV2(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register_model("ResNet34")
def resnet34(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    """ResNet-34: basic blocks (3, 4, 6, 3)."""
    return ResNetV2(BasicBlock, (3, 4, 6, 3), num_classes, in_channels)


@register_model("ResNet50")
def resnet50(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3), 2048-d embedding."""
    return ResNetV2(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
