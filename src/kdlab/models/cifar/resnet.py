"""CIFAR ResNets: resnet8 ... resnet110, resnet8x4 and resnet32x4.

The three-stage ResNet of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016,
Section 4.2), with the ``x4`` wide variants introduced by Tian et al., "Contrastive
Representation Distillation" (CRD, ICLR 2020). Module names, layer order and activations follow
the CRD / mdistiller definitions, so their published teacher checkpoints load unchanged and give
identical logits.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.core.errors import ModelError
from kdlab.models.cifar._common import AliasedHeadModel, staged_output
from kdlab.models.output import ModelOutput
from kdlab.models.registry import register_model


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-conv shortcut (post-activation block).

    ``forward`` returns ``(relu(y), y)`` where ``y`` is the residual sum before the final ReLU.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        pre = out + shortcut
        return F.relu(pre), pre


class ResNet(AliasedHeadModel):
    """CIFAR ResNet of depth ``6n + 2``: a 3x3 stem and three stages of ``n`` basic blocks.

    Args:
        depth: total depth, ``6n + 2`` (8, 14, 20, 32, 44, 56, 110).
        num_filters: channels of the stem and of the three stages, e.g. ``(16, 16, 32, 64)``.
        num_classes: size of the linear head ``fc``.
        in_channels: input channels of the first convolution (1 for Fashion-MNIST).

    ``features`` are ``[stem, stage1, stage2, stage3]`` after their ReLU; ``preact_features``
    the same stages before the last block's final ReLU; ``feature_map`` is the stage-3 output
    (``num_filters[3] x 8 x 8`` for 32x32 inputs).
    """

    _head_path = "fc"

    def __init__(
        self,
        depth: int,
        num_filters: tuple[int, int, int, int],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.in_channels = in_channels
        self._inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * BasicBlock.expansion
        downsample = None
        if stride != 1 or self._inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [BasicBlock(self._inplanes, planes, stride, downsample)]
        self._inplanes = out_planes
        layers += [BasicBlock(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> ModelOutput:
        f0 = F.relu(self.bn1(self.conv1(x)))
        return staged_output(f0, [self.layer1, self.layer2, self.layer3], self.fc)


_SLIM = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-8 (one block per stage), 16/32/64 channels."""
    return ResNet(8, _SLIM, num_classes, in_channels)


@register_model("resnet14")
def resnet14(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-14, 16/32/64 channels."""
    return ResNet(14, _SLIM, num_classes, in_channels)


@register_model("resnet20")
def resnet20(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-20, 16/32/64 channels."""
    return ResNet(20, _SLIM, num_classes, in_channels)


@register_model("resnet32")
def resnet32(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-32, 16/32/64 channels."""
    return ResNet(32, _SLIM, num_classes, in_channels)


@register_model("resnet44")
def resnet44(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-44, 16/32/64 channels."""
    return ResNet(44, _SLIM, num_classes, in_channels)


@register_model("resnet56")
def resnet56(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-56, 16/32/64 channels."""
    return ResNet(56, _SLIM, num_classes, in_channels)


@register_model("resnet110")
def resnet110(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-110, 16/32/64 channels."""
    return ResNet(110, _SLIM, num_classes, in_channels)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-8 with 4x channels (32 stem, 64/128/256 stages), as in CRD."""
    return ResNet(8, _WIDE, num_classes, in_channels)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-32 with 4x channels (32 stem, 64/128/256 stages), as in CRD."""
    return ResNet(32, _WIDE, num_classes, in_channels)
