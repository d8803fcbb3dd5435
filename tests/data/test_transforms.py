from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    RandomResizedCrop,
    Resize,
    ToTensor,
    cub_eval_transform,
    cub_train_transform,
    imagenet_eval_transform,
    imagenet_train_transform,
)


def _img(w: int = 500, h: int = 375, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    "make", [imagenet_train_transform, imagenet_eval_transform, cub_train_transform,
             cub_eval_transform],
)  # fmt: skip
def test_pipelines_shape_and_determinism(make) -> None:
    t = make()
    img = _img()
    a = t(img, np.random.default_rng(3))
    b = t(img, np.random.default_rng(3))
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b)
    u = make(normalize=False)(img, np.random.default_rng(3))
    assert u.dtype == torch.uint8
    ref = (u.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    torch.testing.assert_close(a, ref)


def test_random_train_transforms_vary_with_seed() -> None:
    img = _img()
    for make in (imagenet_train_transform, cub_train_transform):
        t = make()
        outs = [t(img, np.random.default_rng(s)) for s in range(4)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_center_crop_is_the_center() -> None:
    # Each pixel encodes its coordinates: the crop must start at round((H-h)/2), round((W-w)/2).
    h, w = 9, 12
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.arange(h)[:, None]
    arr[..., 1] = np.arange(w)[None, :]
    out = np.asarray(CenterCrop((4, 6))(Image.fromarray(arr)))
    assert out.shape == (4, 6, 3)
    assert out[0, 0, 0] == round((h - 4) / 2) and out[0, 0, 1] == round((w - 6) / 2) == 3
    assert out[-1, -1, 0] == out[0, 0, 0] + 3 and out[-1, -1, 1] == 8


def test_resize_shorter_side_and_exact() -> None:
    assert Resize(256)(_img(500, 375)).size == (341, 256)
    assert Resize(256)(_img(375, 500)).size == (256, 341)
    assert Resize((256, 256))(_img(500, 375)).size == (256, 256)


def test_random_resized_crop_box_within_image() -> None:
    rrc = RandomResizedCrop(224)
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = rrc.params(500, 375, rng)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500


def test_to_tensor_gray_and_values() -> None:
    x = ToTensor(None, None)(Image.new("RGB", (3, 2), (10, 20, 30)))
    assert x.shape == (3, 2, 3) and x[:, 0, 0].tolist() == [10, 20, 30]
