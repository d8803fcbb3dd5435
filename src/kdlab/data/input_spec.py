"""One description of a model's input, carried from the data set to every artefact.

An :class:`InputSpec` says what a trained model expects and how an image file becomes exactly the
tensor the model saw at test time: the class names (index ``i`` of the logits is
``classes[i]``), the colour mode, the evaluation pipeline (resize, centre crop, zero padding,
interpolation) and the normalisation, with the loader's own float arithmetic. It is written into
the run (``input.json``), ``best.pt``, every exported artefact (the state-dict file, TorchScript
and ``torch.export`` extra files, ONNX ``metadata_props``, the hub folder's ``config.json``) and
comes back with :func:`kdlab.load_student` as ``student.kdlab_meta["input"]`` and
``student.preprocess``.

The evaluation pipeline of an image file, in order (``uint8`` until the last step):

1. decode, convert to ``"L"`` (one channel) or ``"RGB"`` (three; Pillow's conversions, so a
   colour image given to a grayscale model becomes ITU-R 601-2 luma);
2. ``resize``: an int resizes the shorter side to it (aspect kept, torchvision's rounding), a
   pair ``[h, w]`` resizes exactly, with ``interpolation`` (bilinear);
3. ``crop``: centre crop to ``crop x crop`` (torchvision's rounding);
4. ``pad``: zero padding of ``pad`` pixels on each side (Fashion-MNIST: 28 -> 32);
5. normalise with ``mean``/``std`` (in ``[0, 1]`` units) in the order ``normalization`` names:
   ``"shift_then_scale"``: ``(x - 255 mean) * (1 / (255 std))`` (the device-resident loader);
   ``"scale_then_shift"``: ``(x * (1 / 255) - mean) * (1 / std)`` (the streamed loader);
   ``"unit"``: ``x / 255`` (detection: the detector normalises inside, see ``model_transform``).

For the device-resident data sets (CIFAR, Fashion-MNIST, synthetic) ``resize`` and ``crop`` are
the images' own size, so an image of the data set's size passes steps 2-3 unchanged and any
other size is resized the way the streamed sets are.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kdlab.core.errors import DatasetError
from kdlab.data.transforms import CenterCrop, Resize

__all__ = [
    "INPUT_SPEC_KIND",
    "NORMALIZATIONS",
    "ImageLike",
    "InputSpec",
    "default_classes",
    "read_image_file",
]

INPUT_SPEC_KIND = "kdlab-input"
#: the normalisation orders (see the module docstring).
NORMALIZATIONS = ("shift_then_scale", "scale_then_shift", "unit")
Normalization = Literal["shift_then_scale", "scale_then_shift", "unit"]
#: what :meth:`InputSpec.preprocess` takes: a path, raw file bytes, a Pillow image, an
#: ``H x W (x C)`` uint8 array, or a ``C x H x W`` uint8 tensor.
ImageLike = str | Path | bytes | Image.Image | np.ndarray | Tensor


def read_image_file(path: str | Path | bytes) -> Image.Image:
    """The image at ``path`` (or in the file bytes), fully decoded.

    Raises :class:`DatasetError` (one line) for a missing or unreadable file."""
    where = "image bytes" if isinstance(path, bytes) else str(path)
    try:
        source = io.BytesIO(path) if isinstance(path, bytes) else path
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except FileNotFoundError as e:
        raise DatasetError(f"{where}: no such image file") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{where}: not a readable image ({e})") from e


@dataclass(frozen=True)
class InputSpec:
    """What a model takes and how an image becomes it (see the module docstring).

    Attributes:
        task: ``"classification"`` or ``"detection"``.
        classes: class names; for classification ``classes[i]`` is logit ``i``; for detection
            ``classes[i]`` is label ``i + 1`` (``0`` is the background).
        channels: 1 (``"L"``) or 3 (``"RGB"``).
        size: side of the square model input (after resize, crop and pad); None: any size
            (detection).
        resize: shorter side (int) or exact ``[h, w]``; None: no resize.
        crop: centre crop side; None: no crop.
        pad: zero padding per side after the crop.
        interpolation: the resize filter.
        mean, std: per-channel normalisation in ``[0, 1]`` units (None with ``"unit"``).
        normalization: the arithmetic order (:data:`NORMALIZATIONS`).
        dataset: the data set it was recorded from (``"fashion_mnist"``, ``"folder:<name>"``).
        model_transform: what the model does to its input itself (detection: the resize to
            ``min_size``/``max_size`` and the normalisation inside the detector).
    """

    task: str
    classes: tuple[str, ...]
    channels: int
    size: int | None
    resize: int | tuple[int, int] | None
    crop: int | None
    pad: int = 0
    interpolation: str = "bilinear"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalization: Normalization = "shift_then_scale"
    dataset: str = ""
    model_transform: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise DatasetError(f"input description: channels must be 1 or 3, got {self.channels}")
        if self.normalization not in NORMALIZATIONS:
            raise DatasetError(f"input description: normalization {self.normalization!r} is not "
                               f"one of {', '.join(NORMALIZATIONS)}")
        if self.normalization != "unit" and (self.mean is None or self.std is None
                                             or len(self.mean) != self.channels
                                             or len(self.std) != self.channels):
            raise DatasetError(f"input description: mean and std need {self.channels} value(s) "
                               f"each, got {self.mean} and {self.std}")
        if self.pad < 0:
            raise DatasetError(f"input description: pad must be >= 0, got {self.pad}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``kind: "kdlab-input"``); :meth:`from_dict` reads it back."""
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        d["resize"] = list(self.resize) if isinstance(self.resize, tuple) else self.resize
        for key in ("mean", "std"):
            d[key] = None if d[key] is None else list(d[key])
        d["model_transform"] = dict(self.model_transform)
        return {"kind": INPUT_SPEC_KIND, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        """The spec written by :meth:`to_dict`. Raises :class:`DatasetError` (one line) for a
        dict that is not one."""
        if not isinstance(d, Mapping) or d.get("kind") != INPUT_SPEC_KIND:
            raise DatasetError("not a kdlab input description (kind 'kdlab-input' missing)")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            kw = {k: v for k, v in d.items() if k in names}
            kw["classes"] = tuple(str(c) for c in kw["classes"])
            if isinstance(kw.get("resize"), list):
                kw["resize"] = tuple(int(v) for v in kw["resize"])
            for key in ("mean", "std"):
                if kw.get(key) is not None:
                    kw[key] = tuple(float(v) for v in kw[key])
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"malformed kdlab input description: {e}") from e

    @property
    def mode(self) -> str:
        """The Pillow mode images are converted to (``"L"`` or ``"RGB"``)."""
        return "L" if self.channels == 1 else "RGB"

    @property
    def num_classes(self) -> int:
        """``len(classes)``."""
        return len(self.classes)

    @property
    def uint8_size(self) -> int | None:
        """Side of the ``uint8`` image before padding (the input of an ONNX graph made with
        ``--include-preprocessing``); None when any size goes (detection)."""
        return None if self.size is None else self.size - 2 * self.pad

    def describe(self) -> str:
        """One line for logs and model cards, e.g. ``RGB, resize 256, crop 224, ...``."""
        steps = [self.mode]
        if self.resize is not None:
            steps.append(f"resize {self.resize} ({self.interpolation})")
        if self.crop is not None:
            steps.append(f"centre crop {self.crop}")
        if self.pad:
            steps.append(f"zero pad {self.pad}")
        if self.normalization == "unit":
            steps.append("x / 255")
        else:
            steps.append(f"normalise mean {list(self.mean or ())} std {list(self.std or ())}")
        return ", ".join(steps)

    # ------------------------------------------------------------------ the pipeline
    def to_uint8(self, image: ImageLike) -> Tensor:
        """Steps 1-4: the ``C x H x W`` ``uint8`` tensor of ``image`` (padded, not normalised).

        A ``C x H x W`` uint8 tensor or ``H x W (x C)`` array is taken as already decoded
        pixels (resized/cropped only when its size differs). Raises :class:`DatasetError`
        for an unreadable file or a wrong dtype."""
        img = self._pil(image)
        if img.mode != self.mode:
            img = img.convert(self.mode)
        if self.resize is not None:
            img = Resize(self.resize)(img)
        if self.crop is not None:
            w, h = img.size
            if min(w, h) < self.crop:  # only without a resize: a too-small image is scaled up
                img = Resize(self.crop)(img)
            img = CenterCrop(self.crop)(img)
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
        return x

    def normalize(self, x: Tensor) -> Tensor:
        """Step 5 on a ``uint8`` batch or image (``... x C x H x W``): float32, with the
        loader's arithmetic, so the result equals the test loader's tensor bit for bit."""
        if x.dtype != torch.uint8:
            raise DatasetError(f"normalize takes uint8 pixels, got {x.dtype}")
        if self.normalization == "unit":
            return x.float().div_(255.0)
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        if self.normalization == "shift_then_scale":
            return (x.float() - mean * 255.0) * (1.0 / (std * 255.0))
        return (x.float() * (1.0 / 255.0) - mean) * (1.0 / std)

    def preprocess(self, image: ImageLike) -> Tensor:
        """``image`` as the ``C x H x W`` float32 tensor the model saw at test time
        (:meth:`to_uint8` then :meth:`normalize`); stack several with :func:`torch.stack`."""
        return self.normalize(self.to_uint8(image))

    def _pil(self, image: ImageLike) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, str | Path | bytes):
            return read_image_file(image)
        if isinstance(image, Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3:
                raise DatasetError(f"an image tensor must be uint8 C x H x W, got {image.dtype} "
                                   f"with shape {tuple(image.shape)}")
            image = image.permute(1, 2, 0).cpu().numpy()
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise DatasetError(f"an image array must be uint8 H x W (x C), got {image.dtype} "
                                   f"with shape {image.shape}")
            if image.ndim == 3 and image.shape[2] == 1:
                image = image[:, :, 0]
            return Image.fromarray(np.ascontiguousarray(image))
        raise DatasetError(f"cannot read an image from a {type(image).__name__}; give a path, "
                           "bytes, a Pillow image, or uint8 pixels")


def default_classes(num_classes: int, names: Sequence[str] | None) -> tuple[str, ...]:
    """``names`` as a tuple, or ``"0", "1", ...`` for a data set without class names."""
    return tuple(str(n) for n in names) if names else tuple(str(i) for i in range(num_classes))
