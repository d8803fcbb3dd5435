"""Wide Residual Networks: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016): pre-activation (BN-ReLU-conv)
basic blocks, depth ``6n + 4``, widths ``16k / 32k / 64k``. Module names (``block1.layer.0.bn1``,
``convShortcut``, ``fc``) and the forward pass follow the CRD / mdistiller definitions, so their
published checkpoints load unchanged and give identical logits.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.core.errors import ModelError
from kdlab.models.cifar._common import AliasedHeadModel, global_avg_pool
from kdlab.models.output import ModelOutput
from kdlab.models.registry import register_model


class BasicBlock(nn.Module):
    """Pre-activation block: ``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` plus shortcut.

    When the channel count changes, the shortcut is a 1x1 conv applied to the *activated* input
    (as in the reference). ``forward`` returns ``(output, bn1(x))``: the block output and its
    input after the first BN, i.e. the previous stage's output before its ReLU.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.bn1(x)
        act = F.relu(pre)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out), pre


class NetworkBlock(nn.Module):
    """One stage: ``n`` blocks in ``self.layer``, the first one strided.

    ``forward`` returns ``(output, pre)`` where ``pre`` is the first block's ``bn1`` output.
    """

    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, first_pre = self.layer[0](x)
        for block in self.layer[1:]:
            x, _ = block(x)
        return x, first_pre


class WideResNet(AliasedHeadModel):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs, head ``fc``.

    ``features`` are ``[conv1, stage1, stage2, stage3]`` exactly as the reference returns them
    (WRN blocks are pre-activation, so these are the raw residual sums); ``preact_features``
    are ``[conv1, BN(stage1), BN(stage2), BN(stage3)]`` (each stage output after the BN that
    precedes its next ReLU); ``feature_map`` is ``relu(bn1(stage3))`` (``64k x 8 x 8`` for 32x32).
    """

    _head_path = "fc"

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ModelError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ModelError(f"WRN widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> ModelOutput:
        f0 = self.conv1(x)
        f1, _ = self.block1(f0)
        f2, f1_pre = self.block2(f1)
        f3, f2_pre = self.block3(f2)
        f3_pre = self.bn1(f3)
        feature_map = F.relu(f3_pre)
        embedding = global_avg_pool(feature_map)
        return ModelOutput(
            logits=self.fc(embedding),
            feature_map=feature_map,
            features=[f0, f1, f2, f3],
            embedding=embedding,
            preact_features=[f0, f1_pre, f2_pre, f3_pre],
        )


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes, in_channels)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes, in_channels)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes, in_channels)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(40, 2, num_classes, in_channels)
