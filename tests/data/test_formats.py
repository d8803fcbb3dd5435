"""On-disk formats: CIFAR pickles (restricted unpickler) and Fashion-MNIST IDX files."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.core.errors import DatasetError
from kdlab.data import load_cifar, load_dataset, load_fashion_mnist, write_cifar, write_idx
from kdlab.data.cifar import restricted_load
from kdlab.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST_MEAN
from kdlab.data.idx import read_idx_images, read_idx_labels

# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name,n_classes", [("cifar100", 100), ("cifar10", 10)])
def test_cifar_round_trip_synthetic_writer(tmp_path: Path, name: str, n_classes: int) -> None:
    folder = write_cifar(tmp_path, name, n_train=203, n_test=50, seed=3)
    train = load_cifar(tmp_path, name, train=True)
    test = load_cifar(folder, name, train=False)  # root may be the folder itself
    assert train.images.shape == (203, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (50, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and int(train.labels.max()) < n_classes
    assert train.num_classes == n_classes and len(train.classes or []) == n_classes
    # Pixels are stored channel-major per row: check one against the raw pickle.
    key = "train" if name == "cifar100" else "data_batch_1"
    raw = restricted_load(folder / key)
    assert np.array_equal(raw[b"data"][0].reshape(3, 32, 32), train.images[0].numpy())


def _independent_cifar100(root: Path, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """A minimal CIFAR-100 writer independent of kdlab: Python 3 pickle, protocol 2."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    fine = [int(v) for v in rng.integers(0, 100, size=n)]
    for split in ("train", "test"):
        record = {
            b"data": data,
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"filenames": [b"x.png"] * n,
            b"batch_label": b"batch",
        }
        with open(folder / split, "wb") as f:
            pickle.dump(record, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"n{i}".encode() for i in range(100)]}, f, protocol=2)
    return data, fine


def test_cifar_reads_independent_writer(tmp_path: Path) -> None:
    data, fine = _independent_cifar100(tmp_path, 37, np.random.default_rng(0))
    ds = load_cifar(tmp_path, "cifar100", train=False)
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(37, 3, 32, 32)))
    assert ds.labels.tolist() == fine
    assert ds.classes is not None and ds.classes[5] == "n5"
    assert ds.mean == (0.5071, 0.4867, 0.4408) and ds.std == (0.2675, 0.2565, 0.2761)


def test_cifar_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cifar-100-python") as err:
        load_cifar(tmp_path / "nowhere", "cifar100")
    assert "download=True" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_truncated_and_corrupt(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, "cifar100", n_train=20, n_test=5)
    blob = (folder / "train").read_bytes()
    (folder / "train").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=r"train is truncated or corrupt"):
        load_cifar(tmp_path, "cifar100", train=True)
    (folder / "test").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DatasetError, match="test"):
        load_cifar(tmp_path, "cifar100", train=False)


def test_cifar_wrong_content(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, "cifar100", n_train=10, n_test=5)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((5, 100), np.uint8), b"fine_labels": [0] * 5}, f, 2)
    with pytest.raises(DatasetError, match="3072"):
        load_cifar(tmp_path, "cifar100", train=False)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((5, 3072), np.uint8), b"fine_labels": [0] * 4}, f, 2)
    with pytest.raises(DatasetError, match="5 images but 4 labels"):
        load_cifar(tmp_path, "cifar100", train=False)


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204 - the payload
        return (os.system, (f"touch {self.target}",))


class _EvilEval:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (eval, (f"open({str(self.target)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Evil, _EvilEval])
def test_malicious_pickle_is_rejected(tmp_path: Path, payload: type) -> None:
    folder = write_cifar(tmp_path, "cifar100", n_train=10, n_test=5)
    marker = tmp_path / "pwned"
    record = {b"data": payload(marker), b"fine_labels": [0]}
    with open(folder / "train", "wb") as f:
        pickle.dump(record, f, protocol=2)
    blob = (folder / "train").read_bytes()
    assert b"system" in blob or b"eval" in blob
    with pytest.raises(DatasetError, match="refusing to load pickle global"):
        load_cifar(tmp_path, "cifar100", train=True)
    assert not marker.exists()


def test_codecs_encode_restricted(tmp_path: Path) -> None:
    # _codecs.encode is allowed only for latin-1 (what protocol 2 emits for bytes).
    evil = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x0a\x00\x00\x00zlib_codecq\x00\x86R."
    path = tmp_path / "p"
    path.write_bytes(evil)
    with pytest.raises(DatasetError, match="zlib_codec"):
        restricted_load(path)


# ----------------------------------------------------------------------------- IDX


def _independent_idx(path: Path, magic: int, array: np.ndarray, gz: bool = False) -> None:
    """A minimal IDX writer independent of kdlab."""
    payload = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    folder = write_idx(tmp_path, n_train=120, n_test=30, seed=1, gz=gz)
    assert (folder / ("train-images-idx3-ubyte" + (".gz" if gz else ""))).is_file()
    train = load_fashion_mnist(tmp_path, train=True)
    test = load_dataset("fashion_mnist", root=folder, train=False)
    assert train.images.shape == (120, 1, 32, 32) and test.images.shape == (30, 1, 32, 32)
    # Zero padding of 2 pixels on every side.
    assert int(train.images[:, :, :2].sum()) == 0 and int(train.images[:, :, :, -2:].sum()) == 0
    assert train.mean == FASHION_MNIST_MEAN and train.num_classes == 10


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_independent_writer(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labs = rng.integers(0, 10, size=7).astype(np.uint8)
    sfx = ".gz" if gz else ""
    _independent_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", 0x803, imgs, gz)
    _independent_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", 0x801, labs, gz)
    ds = load_fashion_mnist(tmp_path, train=False)
    assert torch.equal(ds.images[:, 0, 2:30, 2:30], torch.from_numpy(imgs))
    assert ds.labels.tolist() == labs.tolist()


def test_idx_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    _independent_idx(path, 0x801, np.zeros(5, np.uint8))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: wrong IDX magic"):
        read_idx_images(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path: Path, gz: bool) -> None:
    path = tmp_path / "img"
    _independent_idx(path, 0x803, np.ones((4, 28, 28), np.uint8))
    blob = path.read_bytes()[:-100]
    path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(DatasetError, match=r"img is truncated"):
        read_idx_images(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="truncated"):
        read_idx_labels(path)
    full = gzip.compress(blob)
    path.write_bytes(full[: len(full) // 2])  # truncated gzip stream
    with pytest.raises(DatasetError, match="img"):
        read_idx_images(path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path, n_train=10, n_test=5)
    folder = tmp_path / "fashion-mnist"
    _independent_idx(folder / "t10k-labels-idx1-ubyte", 0x801, np.zeros(4, np.uint8))
    with pytest.raises(DatasetError, match="5 images but .*t10k-labels-idx1-ubyte holds 4"):
        load_fashion_mnist(tmp_path, train=False)


def test_fashion_missing_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte") as err:
        load_fashion_mnist(tmp_path / "none")
    assert str(tmp_path / "none" / "fashion-mnist") in str(err.value)


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KDLAB_DATA", str(tmp_path))  # nothing there: falls back to Debian's
    monkeypatch.chdir(tmp_path)
    train = load_dataset("fashion_mnist", train=True)
    test = load_dataset("fashion_mnist", train=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape[1:] == (1, 32, 32)
    for ds in (train, test):
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
    assert train.class_counts().tolist() == [6000] * 10
    mean = train.images.double().mean().item() / 255
    assert abs(mean - FASHION_MNIST_MEAN[0]) < 5e-5
