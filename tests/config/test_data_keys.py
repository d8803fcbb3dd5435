"""Data keys that the chosen dataset does not read are errors; the streamed training transform is
configurable (issue 23: ``data.hflip: false`` and ``data.crop_padding`` were silently ignored for
folder data, and the random-resized crop's scale was fixed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.config import validate_config
from kdlab.core.errors import ConfigError
from kdlab.data.stream import load_stream_dataset
from kdlab.data.transforms import RandomHorizontalFlip, RandomResizedCrop
from kdlab.tasks import get_task


def _cfg(**data: object):
    return validate_config({"student": {"arch": "resnet8"}, "data": data}, "t").data


@pytest.mark.parametrize(("data", "key"), [
    ({"name": "folder", "root": "x", "crop_padding": 8}, "crop_padding"),
    ({"name": "imagenet", "root": "x", "synthetic": {"n_train": 8}}, "synthetic"),
    ({"name": "cub200", "root": "x", "crop_scale": [0.5, 1.0]}, "crop_scale"),
    ({"name": "cifar100", "num_workers": 2}, "num_workers"),
    ({"name": "fashion_mnist", "image_size": 64}, "image_size"),
    ({"name": "cifar10", "crop_scale": [0.5, 1.0]}, "crop_scale"),
    ({"name": "cifar100", "synthetic": {"n_train": 8}}, "synthetic"),
])
def test_a_key_the_dataset_does_not_read_is_an_error(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.{key} does not apply to dataset "
                                          rf"'{data['name']}' \(.*\); remove it"):
        _cfg(**data)


def test_defaults_and_keys_that_apply_are_accepted() -> None:
    assert _cfg(name="folder", root="x", hflip=False, crop_scale=[0.5, 1.0]).hflip is False
    assert _cfg(name="cifar100", crop_padding=0, hflip=False).crop_padding == 0
    assert _cfg(name="synthetic", synthetic={"n_train": 8}).synthetic.n_train == 8
    # a stored config holds every key at its default: still valid for every dataset
    stored = _cfg(name="cifar100", num_workers=4, image_size=224, resize=256)
    assert stored.inapplicable_keys() == []


@pytest.mark.parametrize(("data", "scale"), [
    ({"name": "folder", "root": "x", "image_size": 32, "resize": 36}, (0.35, 1.0)),
    ({"name": "folder", "root": "x", "image_size": 128, "resize": 146}, (0.08, 1.0)),
    ({"name": "imagenet", "root": "x", "image_size": 64, "resize": 72}, (0.08, 1.0)),
    ({"name": "folder", "root": "x", "crop_scale": [0.2, 0.9]}, (0.2, 0.9)),
])
def test_auto_crop_scale(data: dict, scale: tuple[float, float]) -> None:
    assert _cfg(**data).resolved_crop_scale() == scale


@pytest.mark.parametrize("bad", [[0.0, 1.0], [0.6, 0.5], [0.5, 1.5]])
def test_bad_crop_scale(bad: list[float]) -> None:
    with pytest.raises(ConfigError, match="crop_scale"):
        _cfg(name="folder", root="x", crop_scale=bad)


def test_stream_transform_follows_the_keys(imagenet_root: Path) -> None:
    ds = load_stream_dataset("folder", imagenet_root, train=True, image_size=16, hflip=False,
                             crop_scale=(0.5, 0.9))
    steps = ds.transform.transforms
    assert not any(isinstance(t, RandomHorizontalFlip) for t in steps)
    crop = next(t for t in steps if isinstance(t, RandomResizedCrop))
    assert crop.scale == (0.5, 0.9)
    default = load_stream_dataset("folder", imagenet_root, train=True, image_size=16)
    assert any(isinstance(t, RandomHorizontalFlip) for t in default.transform.transforms)


def test_folder_datasets_are_named_by_their_folder(tmp_path: Path) -> None:
    task = get_task("classification")
    assert task.dataset_label(_cfg(name="folder", root=str(tmp_path / "my_images"))) == (
        "folder:my_images")
    assert task.dataset_label(_cfg(name="cifar100")) == "cifar100"
