"""ShuffleNet V1 for CIFAR, registered as ``ShuffleV1`` (groups 3, 240/480/960 channels).

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices" (CVPR 2018), in the CIFAR variant used by CRD / mdistiller (1x1 stem with 24 channels,
no max-pool). Module names (``layerN.i.convK``, head ``linear``) and the forward pass follow
those definitions, so their checkpoints load unchanged and give identical logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.models.cifar._common import (
    AliasedHeadModel,
    channel_shuffle,
    staged_output,
)
from kdlab.models.output import ModelOutput
from kdlab.models.registry import register_model


class Bottleneck(nn.Module):
    """Grouped 1x1 - shuffle - 3x3 depthwise - grouped 1x1, with an add or concat shortcut.

    Stride-2 blocks concatenate a 3x3 average-pooled shortcut; stride-1 blocks add the input.
    The first block of the network (24 input channels) uses an ungrouped first 1x1 conv.
    ``forward`` returns ``(relu(y), y)``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(
            in_planes, mid_planes, kernel_size=1, groups=self.first_groups, bias=False
        )
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, 3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            pre = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            pre = out + x
        return F.relu(pre), pre


class ShuffleNetV1(AliasedHeadModel):
    """CIFAR ShuffleNet V1: 1x1 stem (24 ch) and three stages, each starting with a stride-2 block.

    ``features`` are ``[stem, stage1, stage2, stage3]`` after ReLU, ``preact_features`` the same
    before the last block's ReLU; ``feature_map`` is the stage-3 output (``960 x 4 x 4`` for 32x32).
    """

    _head_path = "linear"

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self._in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The stride-2 block concatenates its input, so its own branch is narrower.
            branch_planes = out_planes - self._in_planes if i == 0 else out_planes
            layers.append(Bottleneck(self._in_planes, branch_planes, 2 if i == 0 else 1, groups))
            self._in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> ModelOutput:
        f0 = F.relu(self.bn1(self.conv1(x)))
        return staged_output(f0, [self.layer1, self.layer2, self.layer3], self.linear)


@register_model("ShuffleV1")
def shufflev1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNet V1, groups 3 (240/480/960 channels, 4/8/4 blocks)."""
    return ShuffleNetV1(num_classes=num_classes, in_channels=in_channels)
