"""The one batch type of kdlab: what the loaders yield and what the distillers read."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Batch"]


class Batch(NamedTuple):
    """One batch: normalised ``images`` (B x C x H x W), ``labels`` (B, int64) and ``index`` (B,
    int64, each sample's position in the dataset)."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
