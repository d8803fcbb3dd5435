"""Root of the test suite: its folder is on ``sys.path`` (pytest's default ``prepend`` import
mode inserts the folder of a conftest that is not in a package), so every test can import the
shared helpers of :mod:`support`.

It also holds the fixtures of more than one folder: small generated datasets in the real
ImageNet / CUB-200-2011 / class-folder layouts (``imagenet_root``, ``cub_root``), used by the
streamed-data tests (``tests/data``) and the end-to-end streamed run (``tests/cli``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    from PIL import Image  # optional dependency (streamed datasets)

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    """train/ and val/ with 3 wnids x 4 images (JPEG + one PNG), plus one corrupt train JPEG."""
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850"]
    for split in ("train", "val"):
        for c, wnid in enumerate(wnids):
            for k in range(4):
                ext = "PNG" if k == 3 else "JPEG"
                _image(root / split / wnid / f"{wnid}_{k}.{ext}", seed=c * 10 + k)
    (root / "train" / wnids[1] / f"{wnids[1]}_1.JPEG").write_bytes(b"not a jpeg at all")
    (root / "train" / wnids[0] / "notes.txt").write_text("ignored")
    return root


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    """CUB_200_2011 with 3 classes x 3 images; ids 1..9; every third image is a test image."""
    base = tmp_path / "CUB_200_2011"
    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, split, labels = [], [], []
    img_id = 0
    for c, cls in enumerate(names):
        for k in range(3):
            img_id += 1
            rel = f"{cls}/{cls[4:]}_{k:04d}.jpg"
            _image(base / "images" / rel, seed=100 + img_id, size=(64, 48))
            images.append(f"{img_id} {rel}")
            split.append(f"{img_id} {0 if k == 2 else 1}")
            labels.append(f"{img_id} {c + 1}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{i + 1} {n}" for i, n in enumerate(names)))
    return tmp_path


@pytest.fixture
def one_thread() -> Any:
    """One intra-op thread for the test (the machine's cores are shared; several threads of tiny
    ops oversubscribe them), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tv() -> Any:
    """torchvision, as the detector imports it (kdlab's nms/roi_align stand in for its compiled
    ops where the ``KDLAB_TORCHVISION_SHIM`` policy allows it); skips when it cannot be made to
    work here."""
    from kdlab.core.torchvision_shim import import_torchvision_for_detection

    try:
        return import_torchvision_for_detection()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"torchvision unusable: {exc}")

