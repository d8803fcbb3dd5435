"""The input description: an image file -> exactly the tensor the test loader gives the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.config import validate_config
from kdlab.core.errors import DatasetError
from kdlab.data.build import build_data
from kdlab.data.input_spec import InputSpec
from kdlab.data.synthetic import write_cifar, write_idx

CPU = torch.device("cpu")


def _bundle(data: dict, arch: str = "resnet8") -> object:
    streamed = {"num_workers": 0} if data["name"] in ("folder", "cub200") else {}
    cfg = validate_config({"data": {"eval_batch_size": 64, **streamed, **data},
                           "student": {"arch": arch}}).data
    return build_data(cfg, seed=0, device=CPU, channels_last=False)


def _test_batch(bundle: object) -> tuple[torch.Tensor, object]:
    loader = bundle.test_loader  # type: ignore[attr-defined]
    loader.set_epoch(0)
    return next(iter(loader)).images, loader.dataset


def test_fashion_mnist_png_gives_the_test_tensor(tmp_path: Path) -> None:
    """A 28x28 PNG of a test image -> the padded 32x32 tensor the loader made, bit for bit."""
    write_idx(tmp_path, n_train=20, n_test=10)
    bundle = _bundle({"name": "fashion_mnist", "root": str(tmp_path)})
    spec = bundle.input_spec
    assert (spec.channels, spec.size, spec.resize, spec.crop, spec.pad) == (1, 32, 28, 28, 2)
    assert spec.classes[0] == "T-shirt/top" and spec.num_classes == 10
    images, ds = _test_batch(bundle)
    for i in range(3):
        raw = ds.images[i, 0, 2:-2, 2:-2].numpy()  # the source 28x28 pixels
        Image.fromarray(raw).save(tmp_path / f"{i}.png")
        got = spec.preprocess(tmp_path / f"{i}.png")
        assert torch.equal(got, images[i])
    # a colour image of another size is converted to luma and resized, not refused
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert spec.preprocess(rgb).shape == (1, 32, 32)


def test_cifar_pixels_give_the_test_tensor(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    bundle = _bundle({"name": "cifar10", "root": str(tmp_path)})
    spec = bundle.input_spec
    assert (spec.channels, spec.size, spec.pad, spec.normalization) == (
        3, 32, 0, "shift_then_scale")
    images, ds = _test_batch(bundle)
    assert torch.equal(spec.preprocess(ds.images[4]), images[4])  # uint8 C x H x W in
    assert torch.equal(spec.preprocess(ds.images[5].permute(1, 2, 0).numpy()), images[5])


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(3):
                size = (30 + 7 * k, 24)  # W x H differ per image: resize + crop matter
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{k}.png")
    return root


def test_folder_files_give_the_test_tensor(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pets")
    bundle = _bundle({"name": "folder", "root": str(root), "image_size": 16, "resize": 20})
    spec = bundle.input_spec
    assert spec.classes == ("cat", "dog") and spec.dataset == "folder"
    assert (spec.resize, spec.crop, spec.normalization) == (20, 16, "scale_then_shift")
    images, ds = _test_batch(bundle)
    for i, path in enumerate(ds.index.paths):
        assert torch.equal(spec.preprocess(path), images[i]), path


def test_cub_resizes_exactly(cub_root: Path) -> None:
    bundle = _bundle({"name": "cub200", "root": str(cub_root), "image_size": 32, "resize": 40})
    spec = bundle.input_spec
    assert spec.resize == (40, 40)
    images, ds = _test_batch(bundle)
    assert torch.equal(spec.preprocess(ds.index.paths[0]), images[0])


def test_round_trip_through_json() -> None:
    spec = InputSpec(task="classification", classes=("a", "b"), channels=3, size=224,
                     resize=(256, 256), crop=224, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
                     normalization="scale_then_shift", dataset="folder:x")
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert "resize (256, 256)" in spec.describe()


@pytest.mark.parametrize("bad", [
    {"kind": "other"},
    {"kind": "kdlab-input", "task": "classification"},
])
def test_malformed_descriptions_are_refused(bad: dict) -> None:
    with pytest.raises(DatasetError):
        InputSpec.from_dict(bad)


def test_bad_images_are_refused_in_one_line(tmp_path: Path) -> None:
    spec = InputSpec(task="classification", classes=("a",), channels=1, size=8, resize=8,
                     crop=8, mean=(0.5,), std=(0.5,))
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="not a readable image"):
        spec.preprocess(tmp_path / "x.png")
    with pytest.raises(DatasetError, match="no such image"):
        spec.preprocess(tmp_path / "missing.png")
    with pytest.raises(DatasetError, match="uint8"):
        spec.preprocess(torch.zeros(1, 8, 8))
    with pytest.raises(DatasetError, match="mean and std"):
        InputSpec(task="classification", classes=("a",), channels=3, size=8, resize=8, crop=8,
                  mean=(0.5,), std=(0.5,))
