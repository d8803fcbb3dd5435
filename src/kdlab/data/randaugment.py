"""RandAugment on the device, in batches: the strong view of MLKD's two-view input.

The operations, their magnitude ranges and the Cutout that follows are those of the official MLKD
code (Jin, Wang, Lin, CVPR 2023; ``mdistiller/dataset/cifar100.py``: ``RandAugment(2, 10)``, a
FixMatch-style RandAugment whose ``m = 10`` is unused): for every image, ``n = 2`` operations are
drawn uniformly with replacement from the 14 of :data:`OPS`, each with a magnitude drawn
uniformly in its range (:data:`RANGES`), then a Cutout square of side ``u * 0.5 * width``
(``u`` uniform) filled with the colour (125, 123, 114). The official code does this with PIL on
each image; here every operation is pure torch on a ``B x C x H x W`` ``uint8`` batch, and each
one reproduces the PIL operation it replaces (Pillow's integer and float arithmetic, its 16.16
fixed point affine sampling), so the only differences are rounding at exact pixel boundaries of
rotations (Python's ``round(cos, 15)`` is not replicated), probability ~0.

Randomness: all draws of a batch are made on a CPU :class:`torch.Generator` by
:func:`draw_rand_augment` (the caller seeds it from the run's seed, the epoch and the position,
so a resumed run redraws exactly the same augmentation), then moved to the device in one copy.
No host synchronisation happens while augmenting: every operation is evaluated on the whole
batch and selected per image with ``torch.where``.

Channels: 3-channel images follow PIL's RGB mode. 1-channel images (Fashion-MNIST) follow PIL's
``L`` mode: ``Color`` is the identity (an image's own grayscale is itself), ``Contrast`` blends
towards the image's mean, the others act on the one channel; the Cutout fill is 123, the
ITU-R 601 luma of (125, 123, 114) (the official code would fail on ``L`` images). Other channel
counts are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kdlab.core.errors import DatasetError
from kdlab.data.batch import Batch

__all__ = [
    "CUTOUT_FILL",
    "NUM_OPS",
    "OPS",
    "RANGES",
    "RandAugmentDraws",
    "StrongViewLoader",
    "draw_rand_augment",
    "op_magnitude",
    "rand_augment",
    "rand_augment_normalized",
    "strong_view_seed",
]

#: the official ``augment_list`` in its order (an op's index is its number in the draws).
OPS: tuple[str, ...] = (
    "auto_contrast", "brightness", "color", "contrast", "equalize", "identity", "posterize",
    "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y",
)
#: ``(low, high)`` of each op's magnitude ``low + (high - low) * u``, ``u`` uniform in [0, 1)
#: (translations in fractions of the image side, rotation in degrees, shear as the affine factor).
RANGES: dict[str, tuple[float, float]] = {
    "auto_contrast": (0.0, 1.0), "brightness": (0.05, 0.95), "color": (0.05, 0.95),
    "contrast": (0.05, 0.95), "equalize": (0.0, 1.0), "identity": (0.0, 1.0),
    "posterize": (4.0, 8.0), "rotate": (-30.0, 30.0), "sharpness": (0.05, 0.95),
    "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3), "solarize": (0.0, 256.0),
    "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
}
#: operations drawn per image (the official ``RandAugment(2, 10)``).
NUM_OPS = 2
#: the Cutout fill colour of 3-channel images (the official ``(125, 123, 114)``); 1-channel
#: images use its luma, 123.
CUTOUT_FILL: tuple[int, int, int] = (125, 123, 114)
#: the largest Cutout side, as a fraction of the image width (``random() * 0.5``).
CUTOUT_MAX = 0.5

_INDEX = {name: i for i, name in enumerate(OPS)}
_FIXED_POINT_OPS = ("rotate", "shear_x", "shear_y")  # Pillow's 16.16 fixed point affine path
_GEOMETRIC = (*_FIXED_POINT_OPS, "translate_x", "translate_y")


class RandAugmentDraws(NamedTuple):
    """The random draws of a batch of ``B`` images.

    ``ops``: ``B x n`` int64 op numbers (indices into :data:`OPS`); ``levels``: ``B x n``
    float32 in [0, 1), each op's magnitude position in its range; ``cutout``: ``B x 3`` float32
    in [0, 1): the Cutout size (times :data:`CUTOUT_MAX` of the width) and the centre's draws.
    """

    ops: Tensor
    levels: Tensor
    cutout: Tensor

    def to(self, device: torch.device | str) -> RandAugmentDraws:
        """The draws on ``device``."""
        return RandAugmentDraws(*(t.to(device, non_blocking=True) for t in self))

    def take(self, sel: Any) -> RandAugmentDraws:
        """The draws of the images ``sel`` (a slice or an index tensor)."""
        return RandAugmentDraws(*(t[sel] for t in self))


def draw_rand_augment(n: int, generator: torch.Generator,
                      num_ops: int = NUM_OPS) -> RandAugmentDraws:
    """The draws of ``n`` images from ``generator`` (CPU), in this order: the ``n x num_ops`` op
    numbers (uniform, with replacement, as ``random.choices``), their levels, the Cutout draws."""
    ops = torch.randint(0, len(OPS), (n, num_ops), generator=generator)
    levels = torch.rand((n, num_ops), generator=generator)
    cutout = torch.rand((n, 3), generator=generator)
    return RandAugmentDraws(ops, levels, cutout)


def strong_view_seed(seed: int, epoch: int, step: int | None = None, rank: int = 0) -> int:
    """The CPU generator seed of the strong view's draws: a well-mixed function of ``(seed,
    epoch)`` (a whole epoch's draws, the device-resident loader) or of ``(seed, epoch, step,
    rank)`` (one batch, :class:`StrongViewLoader`), independent of the loaders' own streams."""
    words = [int(seed) & 0xFFFFFFFFFFFF, int(epoch), 0x5354524F4E47]  # "STRONG"
    if step is not None:
        words += [int(step), int(rank)]
    state = np.random.SeedSequence(words).generate_state(2)
    return (int(state[0]) << 31) ^ int(state[1])


def op_magnitude(name: str, levels: Tensor) -> Tensor:
    """``low + (high - low) * level`` of op ``name`` (float64), the official ``val``."""
    low, high = RANGES[name]
    return low + (high - low) * levels.to(torch.float64)


# ----------------------------------------------------------------------------- the ops
# Every op maps a float32 batch holding integer pixel values 0..255 (B x C x H x W) and one
# magnitude per image (B, float64) to the same, exactly as the PIL call the official code makes.

def _per_image(v: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    return v.to(dtype).view(-1, 1, 1, 1)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """``Image.blend(degenerate, x, f)`` for ``0 <= f <= 1``: ``trunc(d + f * (x - d))`` in
    float32 with ``f`` rounded to float32, Pillow's ``ImagingBlend``."""
    f = _per_image(factor, torch.float32)
    return torch.trunc(degenerate + f * (x - degenerate))


def _luma(x: Tensor) -> Tensor:
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 32768) >> 16`` (B x 1 x H x W);
    a 1-channel image is its own luma."""
    if x.shape[1] == 1:
        return x
    rgb = x.to(torch.int64)
    y = (rgb[:, 0:1] * 19595 + rgb[:, 1:2] * 38470 + rgb[:, 2:3] * 7471 + 32768) >> 16
    return y.to(x.dtype)


def auto_contrast(x: Tensor, v: Tensor) -> Tensor:
    """``ImageOps.autocontrast``: per channel, ``int(i * s + o)`` (clipped to 0..255) with
    ``s = 255 / (hi - lo)``, ``o = -lo * s`` in float64; a constant channel is unchanged."""
    lo = x.amin(dim=(2, 3), keepdim=True).to(torch.float64)
    hi = x.amax(dim=(2, 3), keepdim=True).to(torch.float64)
    span = (hi - lo).clamp_min(1.0)
    # a true division (``255.0 / t`` would be 255 * reciprocal(t), not Python's 255 / t)
    scale = torch.div(torch.full_like(span, 255.0), span)
    out = torch.trunc(x.to(torch.float64) * scale + (-lo * scale)).clamp(0, 255)
    return torch.where(hi > lo, out.to(x.dtype), x)


def brightness(x: Tensor, v: Tensor) -> Tensor:
    """``ImageEnhance.Brightness(img).enhance(v)``: blend with black."""
    return _blend(torch.zeros_like(x), x, v)


def color(x: Tensor, v: Tensor) -> Tensor:
    """``ImageEnhance.Color(img).enhance(v)``: blend with the image's grayscale (identity for a
    1-channel image)."""
    return _blend(_luma(x).expand_as(x), x, v)


def contrast(x: Tensor, v: Tensor) -> Tensor:
    """``ImageEnhance.Contrast(img).enhance(v)``: blend with the constant
    ``int(mean(luma) + 0.5)``."""
    gray = _luma(x).to(torch.int64)
    n = gray.shape[-1] * gray.shape[-2]
    total = gray.sum(dim=(1, 2, 3), keepdim=True)
    mean = torch.div(2 * total + n, 2 * n, rounding_mode="floor").to(x.dtype)
    return _blend(mean.expand_as(x), x, v)


def equalize(x: Tensor, v: Tensor) -> Tensor:
    """``ImageOps.equalize``: per channel, with ``h`` the histogram and ``N`` the pixel count,
    ``step = (N - h[max]) // 255`` and ``lut[i] = (step // 2 + sum_{j < i} h[j]) // step``
    (clipped to 255); unchanged when ``step == 0``."""
    b, c, hgt, wid = x.shape
    flat = x.reshape(b * c, hgt * wid).to(torch.int64)
    rows = torch.arange(b * c, device=x.device, dtype=torch.int64).unsqueeze(1) * 256
    # integer counts (bincount without weights is deterministic on GPUs too)
    hist = torch.bincount((flat + rows).flatten(), minlength=b * c * 256).view(b * c, 256)
    below = hist.cumsum(dim=1) - hist  # sum_{j<i} h[j]
    top = flat.amax(dim=1, keepdim=True)
    step = torch.div(below.gather(1, top), 255, rounding_mode="floor")  # (N - h[max]) // 255
    lut = torch.div(torch.div(step, 2, rounding_mode="floor") + below, step.clamp_min(1),
                    rounding_mode="floor").clamp_max(255)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.to(x.dtype).view(b, c, hgt, wid)


def posterize(x: Tensor, v: Tensor) -> Tensor:
    """``ImageOps.posterize(img, max(1, int(v)))``: keep the top ``int(v)`` bits."""
    bits = torch.floor(v).clamp(1, 8)
    unit = _per_image(torch.exp2(8 - bits), x.dtype)
    return torch.floor(x / unit) * unit


def sharpness(x: Tensor, v: Tensor) -> Tensor:
    """``ImageEnhance.Sharpness(img).enhance(v)``: blend with ``filter(SMOOTH)``: the 3x3 kernel
    ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` rounded (border pixels unchanged)."""
    hgt, wid = x.shape[-2:]
    # S = the 3x3 neighbourhood's sum + 4 * centre: exact integer sums (no convolution kernel)
    total = 4 * x[:, :, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[:, :, dy:dy + hgt - 2, dx:dx + wid - 2]
    smooth = x.clone()
    rounded = torch.div(2 * total.to(torch.int64) + 13, 26, rounding_mode="floor")
    smooth[:, :, 1:-1, 1:-1] = rounded.to(x.dtype)
    return _blend(smooth, x, v)


def solarize(x: Tensor, v: Tensor) -> Tensor:
    """``ImageOps.solarize(img, v)``: ``i if i < v else 255 - i``."""
    return torch.where(x.to(torch.float64) < _per_image(v), x, 255 - x)


_COLOUR_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "auto_contrast": auto_contrast, "brightness": brightness, "color": color,
    "contrast": contrast, "equalize": equalize, "posterize": posterize,
    "sharpness": sharpness, "solarize": solarize,
}


def affine_coefficients(op: Tensor, v: Tensor, height: int, width: int) -> Tensor:
    """``B x 6`` float64 PIL affine data ``(a, b, c, d, e, f)`` (source = ``(a x + b y + c,
    d x + e y + f)``) of each image's op ``op`` with magnitude ``v``; identity for the
    non-geometric ops.

    ``rotate``: ``Image.rotate(v)`` about ``(w / 2, h / 2)``; ``shear_x``: ``(1, v, 0, 0, 1,
    0)``; ``shear_y``: ``(1, 0, 0, v, 1, 0)``; ``translate_x``: ``(1, 0, v * w, 0, 1, 0)``;
    ``translate_y``: ``(1, 0, 0, 0, 1, v * h)`` (the official ops).
    """
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    angle = torch.where(v < 0, v + 360.0, v)  # Python's v % 360 for |v| < 360
    theta = -(angle * (math.pi / 180.0))
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = width / 2.0, height / 2.0
    rot = torch.stack([cos, sin, (cos * -cx + sin * -cy) + cx,
                       -sin, cos, (-sin * -cx + cos * -cy) + cy], dim=1)
    choices = {
        "rotate": rot,
        "shear_x": torch.stack([one, v, zero, zero, one, zero], dim=1),
        "shear_y": torch.stack([one, zero, zero, v, one, zero], dim=1),
        "translate_x": torch.stack([one, zero, v * width, zero, one, zero], dim=1),
        "translate_y": torch.stack([one, zero, zero, zero, one, v * height], dim=1),
    }
    out = torch.stack([one, zero, zero, zero, one, zero], dim=1)
    for name, coef in choices.items():
        out = torch.where((op == _INDEX[name]).unsqueeze(1), coef, out)
    return out


def _source_pixels(coef: Tensor, fixed: Tensor, height: int, width: int
                   ) -> tuple[Tensor, Tensor]:
    """Source column and row (``B x H x W`` int64) of every output pixel, as Pillow's nearest
    neighbour affine transform samples them: at the pixel centre, in 16.16 fixed point
    (``affine_fixed``: rotations, shears) or in float64 (``ImagingScaleAffine``: translations)."""
    dev = coef.device
    xs = torch.arange(width, device=dev, dtype=torch.float64).view(1, 1, width)
    ys = torch.arange(height, device=dev, dtype=torch.float64).view(1, height, 1)
    a, b, c, d, e, f = (coef[:, i].view(-1, 1, 1) for i in range(6))
    # float64 path (translations and the identity): xin = floor(c + a / 2 + x * a)
    col_f = torch.floor((c + a * 0.5) + xs * a).expand(-1, height, width)
    row_f = torch.floor((f + e * 0.5) + ys * e).expand(-1, height, width)

    def fix(t: Tensor) -> Tensor:
        return torch.floor(t * 65536.0 + 0.5).to(torch.int64)

    xi, yi = xs.to(torch.int64), ys.to(torch.int64)
    col_x = fix(c + a * 0.5 + b * 0.5) + xi * fix(a) + yi * fix(b)
    row_x = fix(f + d * 0.5 + e * 0.5) + xi * fix(d) + yi * fix(e)
    use_fixed = fixed.view(-1, 1, 1)
    col = torch.where(use_fixed, col_x >> 16, col_f.to(torch.int64))
    row = torch.where(use_fixed, row_x >> 16, row_f.to(torch.int64))
    return col, row


def geometric(x: Tensor, op: Tensor, v: Tensor) -> Tensor:
    """Each image's geometric op (rotate, shear, translate; nearest neighbour, black fill, as
    Pillow's ``Image.transform``/``rotate``); the other images unchanged."""
    b, c, hgt, wid = x.shape
    coef = affine_coefficients(op, v, hgt, wid)
    fixed = torch.zeros_like(op, dtype=torch.bool)
    for name in _FIXED_POINT_OPS:
        fixed |= op == _INDEX[name]
    col, row = _source_pixels(coef, fixed, hgt, wid)
    inside = (col >= 0) & (col < wid) & (row >= 0) & (row < hgt)
    src = (row.clamp(0, hgt - 1) * wid + col.clamp(0, wid - 1)).view(b, 1, hgt * wid)
    out = x.reshape(b, c, hgt * wid).gather(2, src.expand(b, c, hgt * wid)).view(b, c, hgt, wid)
    return torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=x.dtype, device=x.device))


def cutout(x: Tensor, draws: Tensor) -> Tensor:
    """The official ``Cutout(img, u0 * 0.5)``: side ``s = u0 * 0.5 * W``; centre ``(W + (1 - W)
    u1, H + (1 - H) u2)`` (``np.random.uniform(w)`` is ``uniform(low=w, high=1)``); corner
    ``x0 = int(max(0, cx - s / 2))``, ``y0`` alike; ``ImageDraw.rectangle((x0, y0, min(W, x0 +
    s), min(H, y0 + s)))`` fills the integer parts of the corners inclusively. No cutout for
    ``s = 0``."""
    b, c, hgt, wid = x.shape
    u = draws.to(torch.float64)
    side = u[:, 0] * CUTOUT_MAX * wid
    cx = wid + (1.0 - wid) * u[:, 1]
    cy = hgt + (1.0 - hgt) * u[:, 2]
    x0 = torch.trunc((cx - side / 2.0).clamp_min(0.0))
    y0 = torch.trunc((cy - side / 2.0).clamp_min(0.0))
    x1 = torch.trunc(torch.minimum(x0 + side, torch.full_like(x0, wid)))
    y1 = torch.trunc(torch.minimum(y0 + side, torch.full_like(y0, hgt)))
    cols = torch.arange(wid, device=x.device, dtype=torch.float64).view(1, 1, wid)
    rows = torch.arange(hgt, device=x.device, dtype=torch.float64).view(1, hgt, 1)
    box = ((cols >= x0.view(-1, 1, 1)) & (cols <= x1.view(-1, 1, 1))
           & (rows >= y0.view(-1, 1, 1)) & (rows <= y1.view(-1, 1, 1))
           & (side > 0).view(-1, 1, 1))
    fill = CUTOUT_FILL if c == 3 else (123,) * c
    colour = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    return torch.where(box.unsqueeze(1), colour, x)


def _apply_slot(x: Tensor, op: Tensor, level: Tensor) -> Tensor:
    """One RandAugment slot: every image's own op ``op`` (B) at ``level`` (B)."""
    out = x
    is_geo = torch.zeros_like(op, dtype=torch.bool)
    for name in _GEOMETRIC:
        is_geo |= op == _INDEX[name]
    magnitude = torch.zeros_like(level, dtype=torch.float64)
    for name in _GEOMETRIC:
        magnitude = torch.where(op == _INDEX[name], op_magnitude(name, level), magnitude)
    out = torch.where(is_geo.view(-1, 1, 1, 1), geometric(x, op, magnitude), out)
    for name, fn in _COLOUR_OPS.items():
        chosen = (op == _INDEX[name]).view(-1, 1, 1, 1)
        out = torch.where(chosen, fn(x, op_magnitude(name, level)), out)
    return out


def rand_augment(images: Tensor, draws: RandAugmentDraws) -> Tensor:
    """RandAugment + Cutout of a ``uint8`` batch ``B x C x H x W`` (C = 1 or 3) on its device.

    For each image ``i``: ``ops[i, 0]`` at magnitude ``op_magnitude(level[i, 0])``, then
    ``ops[i, 1]`` ..., then :func:`cutout`; returns ``uint8`` of the same shape. Official MLKD
    ``RandAugment(2, 10)`` (Jin, Wang, Lin, CVPR 2023), computed as the PIL ops it calls.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DatasetError(f"RandAugment needs a uint8 batch B x C x H x W, got {images.dtype} "
                           f"with shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise DatasetError(f"RandAugment supports 1- or 3-channel images, got "
                           f"{images.shape[1]} channels")
    if draws.ops.shape[0] != images.shape[0]:
        raise DatasetError(f"{draws.ops.shape[0]} RandAugment draws for "
                           f"{images.shape[0]} images")
    draws = draws.to(images.device)
    x = images.to(torch.float32)
    for j in range(draws.ops.shape[1]):
        x = _apply_slot(x, draws.ops[:, j], draws.levels[:, j])
    return cutout(x, draws.cutout).to(torch.uint8)


def rand_augment_normalized(images: Tensor, draws: RandAugmentDraws, mean: Sequence[float],
                            std: Sequence[float]) -> Tensor:
    """:func:`rand_augment` of a normalised float batch ``(x / 255 - mean) / std``.

    The pixels are recovered as ``round((z * std + mean) * 255)`` clamped to 0..255 (exact for a
    batch normalised from ``uint8``), augmented, and normalised again as
    ``(x / 255 - mean) / std``; the dtype is kept.
    """
    c = images.shape[1]
    if len(mean) != c or len(std) != c:
        raise DatasetError(f"mean/std need one value per channel ({c}), got {len(mean)} and "
                           f"{len(std)}")
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    pixels = torch.round((images.float() * s + m) * 255.0).clamp(0, 255).to(torch.uint8)
    out = rand_augment(pixels, draws).float()
    return ((out * (1.0 / 255.0) - m) / s).to(images.dtype)


class StrongViewLoader:
    """Adds the strong view to the batches of a loader that cannot crop a second view itself
    (the streamed loaders): ``strong = rand_augment_normalized(images)``, RandAugment applied
    to the batch's own (weak) crop.

    The official pipeline crops and flips the strong view independently of the weak one (the
    device-resident :class:`kdlab.data.loader.DeviceLoader` does); here both views share the
    crop. The draws of step ``k`` of epoch ``e`` come from a generator seeded with
    :func:`strong_view_seed` ``(seed, e, k, rank)``, so a run resumed mid-epoch sees the same
    views. Everything else (``len``, ``set_epoch``, attributes) is the wrapped loader's.
    """

    def __init__(self, loader: Any, mean: Sequence[float], std: Sequence[float], seed: int,
                 rank: int = 0) -> None:
        self.loader = loader
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed, self.rank = int(seed), int(rank)
        self._epoch, self._start = 0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        loader = self.__dict__.get("loader")
        if loader is None:
            raise AttributeError(name)
        return getattr(loader, name)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The wrapped loader's ``set_epoch``; the strong view follows the same epoch/batch."""
        self.loader.set_epoch(epoch, start_batch=start_batch)
        self._epoch, self._start = int(epoch), int(start_batch)

    def __iter__(self) -> Iterator[Batch]:
        step, self._start = self._start, 0
        for batch in self.loader:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(strong_view_seed(self.seed, self._epoch, step, self.rank))
            draws = draw_rand_augment(batch.images.shape[0], gen)
            yield batch.with_strong(
                rand_augment_normalized(batch.images, draws, self.mean, self.std))
            step += 1
