"""The one batch type of kdlab: what the loaders yield and what the distillers read."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Batch"]


class Batch(NamedTuple):
    """One batch: normalised ``images`` (B x C x H x W), ``labels`` (B, int64) and ``index`` (B,
    int64, each sample's position in the dataset).

    For a method that reads a second view of every image (``Distiller.views``, MLKD) the training
    loader's batches also carry :attr:`strong`. It is an attribute, not a tuple field: a batch
    always unpacks as ``images, labels, index``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    @property
    def strong(self) -> torch.Tensor | None:
        """The strongly augmented view of the same images (normalised like ``images``), or None
        when no method asked for it."""
        return getattr(self, "_strong", None)

    def with_strong(self, strong: torch.Tensor) -> Batch:
        """This batch carrying ``strong`` as its strong view (:attr:`strong`)."""
        return _TwoViewBatch(self.images, self.labels, self.index, strong)


class _TwoViewBatch(Batch):
    """A :class:`Batch` with a strong view (a tuple subclass, so it has an instance dict for it;
    ``_replace`` and ``_make`` drop the view)."""

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                strong: torch.Tensor | None = None) -> _TwoViewBatch:
        self = super().__new__(cls, images, labels, index)
        self._strong = strong
        return self
