"""ShuffleNet V2 (1x) for CIFAR, registered as ``ShuffleV2``.

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design"
(ECCV 2018), in the CIFAR variant used by CRD / mdistiller (1x1 stem with 24 channels, no
max-pool, 116/232/464 stage channels, a 1024-channel last 1x1 conv). Module names
(``layerN.0`` down-sampling unit, ``layerN.i`` basic units, head ``linear``) and the forward pass
follow those definitions, so their checkpoints load unchanged and give identical logits.
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


class BasicBlock(nn.Module):
    """Stride-1 unit: split channels in half, transform the second half, concat, shuffle.

    ``forward`` returns ``(output, pre)``; as in the reference, ``pre`` is the concatenation
    ``[x1, branch before its ReLU]`` taken *before* the channel shuffle.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        branch_pre = self.bn3(self.conv3(out))
        out = torch.cat([x1, F.relu(branch_pre)], 1)
        return channel_shuffle(out, 2), torch.cat([x1, branch_pre], 1)


class DownBlock(nn.Module):
    """Stride-2 unit: two branches on the full input, concatenated (doubling channels), shuffled.

    ``forward`` returns ``(relu(y), y)`` for the shuffled concatenation ``y`` of both branches
    before their final ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch: 3x3 depthwise (stride 2) - 1x1
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: 1x1 - 3x3 depthwise (stride 2) - 1x1
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        left = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn5(self.conv5(self.bn4(self.conv4(right))))
        pre = channel_shuffle(torch.cat([left, right], 1), 2)
        return F.relu(pre), pre


class ShuffleNetV2(AliasedHeadModel):
    """CIFAR ShuffleNet V2: 1x1 stem, three stages (down unit + basic units), 1x1 conv, head.

    ``features`` are ``[stem, stage1, stage2, stage3]`` outputs, ``preact_features`` as the
    reference returns them; ``feature_map`` is ``relu(bn2(conv2(stage3)))``
    (``1024 x 4 x 4`` for 32x32 inputs).
    """

    _head_path = "linear"

    def __init__(
        self,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self._in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self._in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self._in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> ModelOutput:
        f0 = F.relu(self.bn1(self.conv1(x)))
        return staged_output(f0, [self.layer1, self.layer2, self.layer3], self.linear,
                             final=lambda f3: F.relu(self.bn2(self.conv2(f3))))


@register_model("ShuffleV2")
def shufflev2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNet V2 1x (116/232/464 channels, 3/7/3 basic units, 1024-d embedding)."""
    return ShuffleNetV2(num_classes=num_classes, in_channels=in_channels)
