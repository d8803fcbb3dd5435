"""The CIFAR networks adapted to 224-px CUB-200-2011 images, as in the SDD paper's code.

Wei, Luo, Luo, "Scale Decoupled Distillation" (CVPR 2024, Sec. 4, CUB-200) train the CIFAR
architectures from scratch on CUB-200-2011 (Wah et al., 2011). The official code
(``shicaiwei123/SDD-CVPR2024``, ``train_origin.py``: ``modify_teacher_model_for_cub200`` and
``modify_student_model_for_cub200``) builds the CIFAR model and then replaces its stem:

==============  =================================================================  =========
model           change                                                             map @224
==============  =================================================================  =========
resnet32x4/8x4  ``conv1`` -> ``Conv2d(3, 32, 7, stride 2, pad 3)``                  256x28x28
ResNet50        ``conv1`` -> ``Conv2d(3, 64, 7, stride 2, pad 3)``                  2048x14x14
ShuffleV1/V2    ``conv1`` -> ``Conv2d(3, 24, 7, stride 2, pad 3)``                  960/1024x14x14
MobileNetV2     ``conv1`` -> ``[Conv2d(3, 16, 7, 2, 3), BN, ReLU, MaxPool2d(2)]``  1280x7x7
vgg13/vgg8      unchanged (head ``Linear(512, 200)``)                              512x28x28
==============  =================================================================  =========

and replaces the fixed-kernel average pools (``AvgPool2d(28)``, ``AvgPool2d(14)``,
``AvgPool2d(8, ceil_mode=True)``) by ones that cover the whole final map, i.e. global average
pooling, which the kdlab CIFAR models already use. State-dict names are unchanged (the new stem
keeps the name ``conv1``; MobileNetV2's ``conv1.3`` max-pool has no parameters), so checkpoints
of the official code load with :func:`kdlab.models.checkpoint.load_checkpoint`. As in the
official code the replaced stem keeps PyTorch's default initialisation (it is assigned after the
model's own init loop). One deviation: the official ``ShuffleV2_sdd`` still pools with a fixed
``avg_pool2d(out, 4)`` and so cannot run at 224 px; here it pools globally.

Registered as ``<cifar name>_cub`` with ``num_classes=200`` by default: ``resnet32x4_cub``,
``resnet8x4_cub``, ``vgg13_cub``, ``vgg8_cub``, ``ResNet50_cub``, ``MobileNetV2_cub``,
``ShuffleV1_cub``, ``ShuffleV2_cub``.
"""

from __future__ import annotations

from torch import nn

from kdlab.models.cifar.mobilenetv2 import MobileNetV2
from kdlab.models.cifar.resnet import ResNet
from kdlab.models.cifar.resnetv2 import Bottleneck, ResNetV2
from kdlab.models.cifar.shufflenetv1 import ShuffleNetV1
from kdlab.models.cifar.shufflenetv2 import ShuffleNetV2
from kdlab.models.cifar.vgg import _CFGS, VGG
from kdlab.models.registry import register_model

__all__ = [
    "CUB_NUM_CLASSES",
    "MobileNetV2Cub",
    "ResNetCub",
    "ResNetV2Cub",
    "ShuffleNetV1Cub",
    "ShuffleNetV2Cub",
    "stem_7x7",
]

CUB_NUM_CLASSES = 200


def stem_7x7(in_channels: int, out_channels: int) -> nn.Conv2d:
    """The SDD CUB stem: ``Conv2d(in, out, 7, stride=2, padding=3, bias=False)``."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False)


class ResNetCub(ResNet):
    """CIFAR ResNet (``resnet8x4``/``resnet32x4``) with the 7x7/2 CUB stem (28x28 final map)."""

    def __init__(
        self,
        depth: int,
        num_filters: tuple[int, int, int, int],
        num_classes: int = CUB_NUM_CLASSES,
        in_channels: int = 3,
    ) -> None:
        super().__init__(depth, num_filters, num_classes, in_channels)
        self.conv1 = stem_7x7(in_channels, num_filters[0])


class ResNetV2Cub(ResNetV2):
    """CIFAR ``ResNet50`` with the 7x7/2 CUB stem (no max-pool; 14x14 final map)."""

    def __init__(self, num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> None:
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
        self.conv1 = stem_7x7(in_channels, 64)


class ShuffleNetV1Cub(ShuffleNetV1):
    """CIFAR ``ShuffleV1`` with the 7x7/2 CUB stem in place of the 1x1 conv (14x14 map)."""

    def __init__(self, num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = stem_7x7(in_channels, 24)


class ShuffleNetV2Cub(ShuffleNetV2):
    """CIFAR ``ShuffleV2`` with the 7x7/2 CUB stem in place of the 1x1 conv (14x14 map)."""

    def __init__(self, num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = stem_7x7(in_channels, 24)


class MobileNetV2Cub(MobileNetV2):
    """CIFAR half-width ``MobileNetV2`` with the CUB stem ``[7x7/2 conv, BN, ReLU, 2x2 max-pool]``
    (``conv_bn()`` of the official ``train_origin.py``; 7x7 final map)."""

    def __init__(self, num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> None:
        super().__init__(6, 0.5, num_classes, in_channels)
        self.conv1 = nn.Sequential(
            stem_7x7(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d((2, 2))
        )


@register_model("resnet32x4_cub")
def resnet32x4_cub(num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> ResNetCub:
    """resnet32x4 for CUB (SDD teacher, 66.17% in the paper)."""
    return ResNetCub(32, (32, 64, 128, 256), num_classes, in_channels)


@register_model("resnet8x4_cub")
def resnet8x4_cub(num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> ResNetCub:
    """resnet8x4 for CUB."""
    return ResNetCub(8, (32, 64, 128, 256), num_classes, in_channels)


@register_model("ResNet50_cub")
def resnet50_cub(num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> ResNetV2Cub:
    """CIFAR ResNet50 for CUB (SDD teacher, 60.01% in the paper)."""
    return ResNetV2Cub(num_classes, in_channels)


@register_model("vgg13_cub")
def vgg13_cub(num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> VGG:
    """vgg13 for CUB: the CIFAR definition unchanged (SDD teacher, 70.19% in the paper)."""
    return VGG(_CFGS["vgg13"], num_classes, in_channels)


@register_model("vgg8_cub")
def vgg8_cub(num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> VGG:
    """vgg8 for CUB: the CIFAR definition unchanged."""
    return VGG(_CFGS["vgg8"], num_classes, in_channels)


@register_model("MobileNetV2_cub")
def mobilenetv2_cub(num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> MobileNetV2Cub:
    """Half-width MobileNetV2 for CUB."""
    return MobileNetV2Cub(num_classes, in_channels)


@register_model("ShuffleV1_cub")
def shufflev1_cub(num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> ShuffleNetV1Cub:
    """ShuffleNetV1 (g=3) for CUB."""
    return ShuffleNetV1Cub(num_classes, in_channels)


@register_model("ShuffleV2_cub")
def shufflev2_cub(num_classes: int = CUB_NUM_CLASSES, in_channels: int = 3) -> ShuffleNetV2Cub:
    """ShuffleNetV2 (1x) for CUB."""
    return ShuffleNetV2Cub(num_classes, in_channels)
