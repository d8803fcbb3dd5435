from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.core.errors import DatasetError
from kdlab.data.cub import cub_index
from kdlab.data.folder import imagenet_index, scan_class_folder


def test_imagenet_layout(imagenet_root: Path) -> None:
    tr = imagenet_index(imagenet_root, train=True)
    va = imagenet_index(imagenet_root, train=False)
    assert tr.classes == va.classes == ["n01440764", "n01443537", "n01484850"]
    assert len(tr) == len(va) == 12  # the .txt file is ignored, the PNG is kept
    assert tr.labels == [0] * 4 + [1] * 4 + [2] * 4
    assert all("n01443537" in p for p, lab in zip(tr.paths, tr.labels, strict=True) if lab == 1)


def test_flat_folder_is_explained(tmp_path: Path, imagenet_root: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.JPEG").write_bytes(b"x")
    with pytest.raises(DatasetError, match="sub-folder per class"):
        scan_class_folder(flat)
    with pytest.raises(DatasetError, match="not found"):
        scan_class_folder(tmp_path / "missing")


def test_cub_split_and_labels(cub_root: Path) -> None:
    tr = cub_index(cub_root, train=True)
    te = cub_index(cub_root / "CUB_200_2011", train=False)
    assert len(tr) == 6 and len(te) == 3
    assert tr.labels == [0, 0, 1, 1, 2, 2] and te.labels == [0, 1, 2]
    assert tr.classes[0] == "001.Black_footed_Albatross" and tr.num_classes == 3
    assert all(p.endswith("_0002.jpg") for p in te.paths)


def test_cub_errors(cub_root: Path) -> None:
    base = cub_root / "CUB_200_2011"
    (base / "image_class_labels.txt").write_text("1 1\n2 7\n3 1\n4 2\n5 2\n6 2\n7 3\n8 3\n9 3\n")
    with pytest.raises(DatasetError, match="label 7"):
        cub_index(cub_root, train=True)
    (base / "train_test_split.txt").write_text("1 1\n")
    with pytest.raises(DatasetError, match="different"):
        cub_index(cub_root)
    with pytest.raises(DatasetError, match="no CUB_200_2011"):
        cub_index(cub_root / "nothing")
