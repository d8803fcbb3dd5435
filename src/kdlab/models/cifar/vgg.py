"""VGG with BatchNorm for CIFAR: vgg8, vgg11, vgg13, vgg16, vgg19 (CRD's ``vggN_bn``).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(ICLR 2015) with BatchNorm after every convolution and the fully connected layers replaced by
global average pooling and one linear layer, as in the CRD / mdistiller CIFAR definitions (five
conv blocks ``block0..block4``, head ``classifier``). Names and forward pass follow those
definitions, so their published checkpoints load unchanged and give identical logits.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.models.cifar._common import global_avg_pool, init_he_fan_out
from kdlab.models.output import KdModel, ModelOutput
from kdlab.models.registry import register_model

# Output channels of each conv in each of the five blocks.
_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [
        [64, 64],
        [128, 128],
        [256, 256, 256, 256],
        [512, 512, 512, 512],
        [512, 512, 512, 512],
    ],
}


def _make_block(channels: list[int], in_channels: int) -> nn.Sequential:
    """``[conv3x3(bias) - BN - ReLU] * k`` without the final ReLU (the model applies it)."""
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c)]
        layers.append(nn.ReLU(inplace=True))
        in_channels = c
    return nn.Sequential(*layers[:-1])


class VGG(KdModel):
    """Five conv blocks separated by 2x2 max-pools, then global average pooling and a linear head.

    As in the reference, the max-pool between block3 and block4 is applied only to 64x64 inputs,
    so a 32x32 input gives a ``512 x 4 x 4`` ``feature_map`` (the ReLU'd block4 output).
    ``features`` are the five block outputs after ReLU, ``preact_features`` the same before it
    (the stem entry is post-ReLU in both, as in the reference).
    """

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.block0 = _make_block(cfg[0], in_channels)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.classifier = nn.Linear(cfg[4][-1], num_classes)

        init_he_fan_out(self)

    def forward(self, x: Tensor) -> ModelOutput:
        pool_before_block4 = x.shape[2] == 64
        f0 = F.relu(self.block0(x))
        f1_pre = self.block1(F.max_pool2d(f0, 2))
        f1 = F.relu(f1_pre)
        f2_pre = self.block2(F.max_pool2d(f1, 2))
        f2 = F.relu(f2_pre)
        f3_pre = self.block3(F.max_pool2d(f2, 2))
        f3 = F.relu(f3_pre)
        f4_pre = self.block4(F.max_pool2d(f3, 2) if pool_before_block4 else f3)
        f4 = F.relu(f4_pre)
        embedding = global_avg_pool(f4)
        return ModelOutput(
            logits=self.classifier(embedding),
            feature_map=f4,
            features=[f0, f1, f2, f3, f4],
            embedding=embedding,
            preact_features=[f0, f1_pre, f2_pre, f3_pre, f4_pre],
        )


@register_model("vgg8")
def vgg8(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-8 with BatchNorm (CRD ``vgg8_bn``)."""
    return VGG(_CFGS["vgg8"], num_classes, in_channels)


@register_model("vgg11")
def vgg11(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-11 with BatchNorm (configuration A)."""
    return VGG(_CFGS["vgg11"], num_classes, in_channels)


@register_model("vgg13")
def vgg13(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-13 with BatchNorm (configuration B)."""
    return VGG(_CFGS["vgg13"], num_classes, in_channels)


@register_model("vgg16")
def vgg16(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-16 with BatchNorm (configuration D)."""
    return VGG(_CFGS["vgg16"], num_classes, in_channels)


@register_model("vgg19")
def vgg19(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-19 with BatchNorm (configuration E)."""
    return VGG(_CFGS["vgg19"], num_classes, in_channels)
