"""The training augmentation of semantic segmentation, seeded per sample.

The steps of torchvision's segmentation reference (``references/segmentation/presets.py``,
``SegmentationPresetTrain``), in order, on a uint8 ``3 x H x W`` image and its uint8 ``H x W``
label map:

1. random rescale: a factor ``s ~ U(scale_range)``; the shorter side becomes
   ``round(s * base_size)`` (the image's own shorter side when ``base_size`` is None), the
   aspect ratio kept; the image bilinearly (antialiased when shrinking), the labels by nearest
   neighbour (label values are never blended);
2. pad to at least the crop's ``h x w`` on the bottom and right: image 0, labels
   ``ignore_index``;
3. random ``h x w`` crop (top-left corner uniform over the valid positions), where ``(h, w)``
   is :func:`crop_hw` of ``segmentation.crop_size`` (an int: a square; a pair: ``[h, w]``, as
   CIRKD's ``--crop-size 512 1024`` on Cityscapes);
4. horizontal flip with probability 1/2 (image and labels together).

Normalisation (``(x / 255 - mean) / std``) happens on the device, in the loader. Every random
draw of a sample comes from a generator seeded by :func:`sample_seed` ``(seed, epoch, index)``,
in the fixed order scale, top, left, flip, so a sample's crop is a pure function of the run's
seed, the epoch and the sample's index: the same on resume (even mid-epoch), on any rank and in
any DataLoader worker.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment_sample", "crop_hw", "resize_pair", "sample_seed"]

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch`` of a run seeded ``seed`` (a
    fixed mixing of the three integers; distinct triples give distinct streams in practice)."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index * 6_700_417 + 12_345) & _MASK


def crop_hw(crop_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(height, width)`` of a training crop given as ``segmentation.crop_size``: an int is a
    square of that side, a pair is ``[height, width]``."""
    if isinstance(crop_size, int):
        return crop_size, crop_size
    h, w = crop_size
    return int(h), int(w)


def resize_pair(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``image`` (uint8 ``3 x H x W``) resized bilinearly to ``size`` = ``(h, w)`` (antialiased
    when shrinking, rounded back to uint8) and ``label`` (uint8 ``H x W``) by nearest neighbour."""
    if tuple(image.shape[-2:]) == size:
        return image, label
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    img = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                        antialias=shrink)[0]
    img = img.round_().clamp_(0, 255).to(torch.uint8)
    lab = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0]
    return img, lab.to(torch.uint8)


def augment_sample(image: Tensor, label: Tensor, *, generator: torch.Generator,
                   crop_size: int | tuple[int, int], scale_range: tuple[float, float],
                   base_size: int | None, ignore_index: int,
                   hflip: bool = True) -> tuple[Tensor, Tensor]:
    """Steps 1-4 of the module docstring; returns the ``3 x h x w`` uint8 image and its
    ``h x w`` uint8 labels, ``(h, w) = crop_hw(crop_size)``. ``generator`` supplies every draw
    (seed it with :func:`sample_seed`)."""
    ch, cw = crop_hw(crop_size)
    lo, hi = scale_range
    s = lo + (hi - lo) * float(torch.rand((), generator=generator))
    h, w = int(image.shape[-2]), int(image.shape[-1])
    short = min(h, w)
    target = max(1, round(s * (base_size if base_size is not None else short)))
    size = (max(1, round(h * target / short)), max(1, round(w * target / short)))
    image, label = resize_pair(image, label, size)
    ph, pw = max(ch - size[0], 0), max(cw - size[1], 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0)
        label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
    H, W = int(image.shape[-2]), int(image.shape[-1])
    top = int(torch.randint(0, H - ch + 1, (), generator=generator))
    left = int(torch.randint(0, W - cw + 1, (), generator=generator))
    image = image[:, top:top + ch, left:left + cw]
    label = label[top:top + ch, left:left + cw]
    flip = bool(torch.rand((), generator=generator) < 0.5)
    if hflip and flip:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()
