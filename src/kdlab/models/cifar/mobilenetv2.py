"""Half-width MobileNetV2 for CIFAR (CRD's ``mobile_half``), registered as ``MobileNetV2``.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018), in the
CIFAR variant used by Jin et al., "Knowledge Distillation via Route Constrained Optimization"
(ICCV 2019) and by CRD / mdistiller: expansion 6, width multiplier 0.5, stride-2 stem, a
1280-channel last 1x1 conv. Module names (``conv1``, ``blocks``, ``conv2``, ``classifier.0``)
and the forward pass follow those definitions, so their checkpoints load unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdlab.models.cifar._common import AliasedHeadModel, global_avg_pool, init_he_fan_out
from kdlab.models.output import ModelOutput
from kdlab.models.registry import register_model

# (expansion t, output channels c, repeats n, first stride s) at width 1.0; t=None means T.
_SETTINGS: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - BN - ReLU - 3x3 depthwise - BN - ReLU - 1x1 project - BN (linear output).

    The layers live in ``self.conv`` (indices 0..7, as in the reference); a residual connection
    is added when the stride is 1 and the channel count is unchanged.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(AliasedHeadModel):
    """CIFAR MobileNetV2 with expansion ``expansion`` and width multiplier ``width_mult``.

    The head is stored as ``classifier.0`` (a one-layer ``Sequential``, as in the reference);
    ``model.classifier`` returns that ``nn.Linear``. ``features`` are
    ``[stem, blocks[1], blocks[2], blocks[4], blocks[6]]`` outputs (the block outputs are linear,
    so ``preact_features`` is the same list); ``feature_map`` is the ReLU'd output of the last
    1x1 conv (``1280 x 2 x 2`` for 32x32 inputs).
    """

    _head_path = "classifier.0"

    def __init__(
        self,
        expansion: int = 6,
        width_mult: float = 0.5,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTINGS:
            out_channels = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(channels, out_channels, stride, t or expansion))
                channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channels, 1, 1)
        self.add_module("classifier", nn.Sequential(nn.Linear(last_channels, num_classes)))

        init_he_fan_out(self)

    def forward(self, x: Tensor) -> ModelOutput:
        f0 = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        feature_map = self.conv2(f4)
        embedding = global_avg_pool(feature_map)
        features = [f0, f1, f2, f3, f4]
        return ModelOutput(
            logits=self.classifier(embedding),
            feature_map=feature_map,
            features=features,
            embedding=embedding,
            preact_features=list(features),
        )


@register_model("MobileNetV2")
def mobilenetv2_half(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 with expansion 6 and width 0.5 (CRD ``mobile_half``)."""
    return MobileNetV2(6, 0.5, num_classes, in_channels)
