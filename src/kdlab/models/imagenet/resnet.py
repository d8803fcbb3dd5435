"""ImageNet ResNet-18/34/50 with torchvision's parameter names.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016), in the layout of
``torchvision.models.resnet`` (the "v1.5" Bottleneck with its stride on the 3x3 convolution).
Every parameter and buffer name (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
..., ``fc``) and every initialisation is torchvision's, so torchvision's published weight files
(``resnet18-f37072fd.pth``, ``resnet34-b627a593.pth``, ``resnet50-0676ba61.pth``/``-11ad3fa6``)
load with :func:`kdlab.models.checkpoint.load_checkpoint` unchanged and give the same logits. These
are the ImageNet teachers and students of DKD (Zhao et al., CVPR 2022) and SDD (Wei et al., CVPR
2024): ResNet34 -> ResNet18, ResNet50 -> MobileNetV1.

Registered as ``resnet18_imagenet``, ``resnet34_imagenet``, ``resnet50_imagenet`` (the CIFAR zoo
already owns ``ResNet18``/``ResNet50``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.models.cifar._common import AliasedHeadModel, staged_output
from kdlab.models.output import ModelOutput
from kdlab.models.registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ImageNetResNet", "resnet18", "resnet34", "resnet50"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``; ``forward`` returns ``(relu(y), y)`` (``y``: residual sum)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        pre = out + identity
        return F.relu(pre), pre


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on ``conv2``); returns ``(relu(y), y)``."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        pre = out + identity
        return F.relu(pre), pre


class ImageNetResNet(AliasedHeadModel):
    """The ImageNet ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, global pooling, ``fc``.

    Args:
        block: :class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50).
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)``.
        num_classes: size of the linear head ``fc`` (``model.classifier`` returns it).
        in_channels: input channels of ``conv1``.

    ``features`` are ``[stem (after max-pool), layer1, layer2, layer3, layer4]`` after their
    ReLU, ``preact_features`` the same before the last block's final ReLU (the stem is shared);
    ``feature_map`` is the ``layer4`` output, ``512 x 7 x 7`` (``2048 x 7 x 7`` for ResNet-50)
    at 224 px.
    """

    _head_path = "fc"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        # torchvision's initialisation (zero_init_residual=False; nn.Linear keeps its default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> ModelOutput:
        f0 = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return staged_output(f0, [self.layer1, self.layer2, self.layer3, self.layer4], self.fc)


@register_model("resnet18_imagenet")
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ResNet-18 (torchvision ``resnet18`` names), the ImageNet student of R34 -> R18."""
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register_model("resnet34_imagenet")
def resnet34(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ResNet-34 (torchvision ``resnet34`` names), the ImageNet teacher of R34 -> R18."""
    return ImageNetResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels)


@register_model("resnet50_imagenet")
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ResNet-50 (torchvision ``resnet50`` names), the ImageNet teacher of R50 -> MobileNetV1."""
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
