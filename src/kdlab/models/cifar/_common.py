"""Small pieces shared by the CIFAR model definitions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.models.output import KdModel, ModelOutput


def global_avg_pool(x: Tensor) -> Tensor:
    """Average a ``B x C x H x W`` map over space into a ``B x C`` vector.

    The reference definitions pool with a fixed kernel (``AvgPool2d(8)`` for the CIFAR ResNets,
    ``avg_pool2d(x, 4)`` for the ShuffleNets, ...) that covers the whole final map of a 32x32
    input, so on 32x32 inputs this is the same operation. Global pooling also works on other input
    sizes (e.g. 28x28 Fashion-MNIST), where the fixed kernels would fail or change the head's
    input size.
    """
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def init_he_fan_out(model: nn.Module) -> None:
    """The CRD VGG/MobileNetV2 initialisation: convs ``N(0, sqrt(2 / fan_out))`` (He et al.,
    2015), BatchNorm weight 1 and bias 0, linear layers ``N(0, 0.01)`` with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def run_stage(stage: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run blocks that each return ``(output, pre_activation)``; return the last block's pair."""
    pre = x
    for block in stage:
        x, pre = block(x)
    return x, pre


def staged_output(
    stem: Tensor,
    stages: Sequence[nn.Sequential],
    head: nn.Module,
    final: Callable[[Tensor], Tensor] | None = None,
) -> ModelOutput:
    """The forward pass shared by the staged models (ResNets, ShuffleNets).

    ``stem`` is the stem's output ``f0``; each stage runs through :func:`run_stage` on the
    previous output. ``features`` are ``[f0, f1, ..., fn]`` and ``preact_features``
    ``[f0, pre_1, ..., pre_n]``; ``feature_map`` is ``final(fn)`` (``fn`` when ``final`` is None),
    globally pooled into ``embedding`` and classified by ``head``.
    """
    features, preact = [stem], [stem]
    out = stem
    for stage in stages:
        out, pre = run_stage(stage, out)
        features.append(out)
        preact.append(pre)
    feature_map = out if final is None else final(out)
    embedding = global_avg_pool(feature_map)
    return ModelOutput(logits=head(embedding), feature_map=feature_map, features=features,
                       embedding=embedding, preact_features=preact)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: ``[B, g*c, H, W] -> [B, c*g, H, W]`` (transpose of groups)."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class AliasedHeadModel(KdModel):
    """A :class:`KdModel` whose linear head is stored under its reference attribute name.

    The CRD / mdistiller definitions name the head ``fc``, ``linear`` or ``classifier.0``; the
    state-dict keys must keep that name so published checkpoints load unchanged. ``classifier``
    is therefore a property that returns the stored head (no second state-dict entry), and
    assigning ``model.classifier = nn.Linear(...)`` replaces the stored head in place.

    Subclasses set ``_head_path`` to the dotted module path of the head (e.g. ``"fc"``).
    """

    _head_path: ClassVar[str]

    def _head_parent(self) -> tuple[nn.Module, str]:
        # Walk ``_modules`` directly: ``getattr(self, "classifier")`` would hit the property.
        *parents, leaf = self._head_path.split(".")
        module: nn.Module = self
        for part in parents:
            child = module._modules.get(part)
            if child is None:
                name = type(self).__name__
                raise AttributeError(f"{name} has no head module {self._head_path!r}")
            module = child
        return module, leaf

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        """The linear head (the module stored at ``_head_path``)."""
        parent, leaf = self._head_parent()
        head = parent._modules.get(leaf)
        if head is None:
            raise AttributeError(f"{type(self).__name__} has no head at {self._head_path!r}")
        return head  # type: ignore[return-value]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "classifier":
            parent, leaf = self._head_parent()
            nn.Module.__setattr__(parent, leaf, value)
            return
        super().__setattr__(name, value)
