"""The one output type every kdlab model returns (architecture contract 1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["KdModel", "ModelOutput"]


@dataclass
class ModelOutput:
    """What a classifier's forward pass exposes to distillation methods.

    Attributes:
        logits: ``B x K`` class scores.
        feature_map: ``B x C x H x W``, the final map after the last activation, right before
            global pooling. SDD (Wei et al., CVPR 2024) applies ``classifier`` to pooled regions
            of this map.
        features: one tensor per stage, ``features[0]`` the stem output and ``features[i]`` the
            output of stage ``i`` (post-activation), as feature methods (FitNet, AT, ReviewKD) use.
        embedding: ``B x C``, the globally pooled vector fed to the classifier
            (``logits == classifier(embedding)``).
        preact_features: the same stages before their final ReLU where the architecture has one
            (ReviewKD and some feature methods use them); empty when not provided.
        views: the model's outputs on other views of the same images, by view name, filled by
            the task for methods that ask for them (``Distiller.views``; MLKD: ``"strong"``);
            empty otherwise. The output itself is always the weak view's (the batch's images).
        region_logits: SDD's local logits ``B x K x N`` (region 0 global) as
            ``region_logits(scales, layout)``, for outputs whose "classifier" is not a linear
            map of ``feature_map`` (detection: the RoI box head,
            :mod:`kdlab.tasks.detection.model`);
            None for classifiers, where SDD pools ``feature_map`` itself.
        dist_logits: ``B x K`` scores of a distillation-token head (DeiT, Touvron et al., ICML
            2021) in training mode, for students that have one; None otherwise. In eval mode
            such a student's ``logits`` are already the mean of its two heads.
        dense_logits: the ``B x K x H x W`` logit map when ``logits`` is a segmentation
            model's pixel view (``(B H W) x K`` rows of the labelled pixels), for the methods
            that work on maps (CWD, SDD on maps); None otherwise.
        pixel_mask: with ``dense_logits``: the flat ``B H W`` boolean mask of the pixels whose
            rows ``logits`` holds (b, h, w order).
    """

    logits: Tensor
    feature_map: Tensor
    features: list[Tensor] = field(default_factory=list)
    embedding: Tensor | None = None
    preact_features: list[Tensor] = field(default_factory=list)
    views: dict[str, ModelOutput] = field(default_factory=dict)
    region_logits: Callable[[Sequence[int], str], Tensor] | None = None
    dist_logits: Tensor | None = None
    dense_logits: Tensor | None = None
    pixel_mask: Tensor | None = None

    def detach(self) -> ModelOutput:
        """A copy with every tensor detached (used for the frozen teacher)."""
        return ModelOutput(
            logits=self.logits.detach(),
            feature_map=self.feature_map.detach(),
            features=[f.detach() for f in self.features],
            embedding=None if self.embedding is None else self.embedding.detach(),
            preact_features=[f.detach() for f in self.preact_features],
            views={k: v.detach() for k, v in self.views.items()},
            region_logits=self.region_logits,
            dist_logits=None if self.dist_logits is None else self.dist_logits.detach(),
            dense_logits=None if self.dense_logits is None else self.dense_logits.detach(),
            pixel_mask=self.pixel_mask,
        )


class KdModel(nn.Module):
    """Base class of kdlab classifiers: ``forward(x) -> ModelOutput`` and a linear ``classifier``.

    Subclasses set ``self.classifier`` (an ``nn.Linear`` callable on ``(..., C)``) and implement
    ``forward``. ``num_classes`` and ``in_channels`` are recorded for checkpoint checks.
    """

    classifier: nn.Linear
    num_classes: int
    in_channels: int
    #: True when ``feature_map`` and ``features`` are a transformer's patch tokens laid out as
    #: ``B x C x H' x W'`` grids (kdlab's ViTs, adapted timm ViT/DeiT/Swin), not convolution maps.
    token_grid: bool = False
    #: True for students with a DeiT distillation token and head (``ModelOutput.dist_logits``).
    distillation_token: bool = False

    def forward(self, x: Tensor) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def probe(self, input_size: int = 32) -> ModelOutput:
        """Run one dummy batch of 2 images (in eval mode) to discover feature shapes."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = self(torch.zeros(2, self.in_channels, input_size, input_size, device=device))
        self.train(was_training)
        return out
