"""CIFAR-10 and CIFAR-100 in the original "python version" pickle format.

Folder layouts (as extracted from the official archives):

* ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta``; each batch is a dict with ``b"data"`` (``N x 3072`` uint8, channel-major
  32x32 planes) and ``b"labels"`` (list of int).
* ``cifar-100-python/``: ``train``, ``test``, ``meta``; ``b"data"`` and ``b"fine_labels"``
  (and ``b"coarse_labels"``); ``meta`` holds ``b"fine_label_names"``.

The files are pickles, and unpickling can run arbitrary code. They are therefore read with
:class:`RestrictedUnpickler`, which resolves only the handful of globals that numpy arrays of
plain dtypes need and refuses everything else.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.core.errors import DatasetError
from kdlab.data.dataset import ImageTensorDataset, default_data_root
from kdlab.data.download import download_and_extract

__all__ = ["CIFAR_SPECS", "CifarSpec", "RestrictedUnpickler", "load_cifar", "restricted_load"]

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to what pickle protocol 2 emits for ``bytes`` (latin-1 text)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise DatasetError(f"refusing pickle call _codecs.encode(..., {encoding!r})")
    return codecs.encode(text, "latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    """The only globals a CIFAR pickle may reference.

    * ``numpy.core.multiarray._reconstruct`` (numpy 1 / Python 2 writers, i.e. the official
      files) or ``numpy._core.multiarray._reconstruct`` (numpy 2): creates the empty array,
    * ``numpy.ndarray`` and ``numpy.dtype``: the array subtype and its dtype,
    * ``numpy.core.multiarray.scalar`` (and the ``numpy._core`` alias): numpy scalars,
    * ``_codecs.encode``: how Python 3 writes ``bytes`` in protocol 2 (``encode(str, "latin1")``).

    The names are mapped to the objects directly, so the deprecated ``numpy.core`` module is never
    imported and no other attribute of any module can be reached.
    """
    table: dict[tuple[str, str], Callable[..., Any] | type] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = _multiarray._reconstruct
        table[(module, "scalar")] = _multiarray.scalar
    return table


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves the globals numpy arrays need (see ``_allowed_globals``).

    Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises
    :class:`DatasetError` before it is looked up, so a crafted file cannot run code.
    """

    source: str = "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only when it is on the allow-list."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self.source}: refusing to load pickle global {module}.{name} (not a plain "
                "CIFAR file; re-download it from the official source)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Persistent ids never occur in CIFAR files."""
        raise DatasetError(f"{self.source}: unexpected persistent id in pickle; not a CIFAR file")


def restricted_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"``, as the official
    files were written by Python 2). Truncated or corrupt files raise :class:`DatasetError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from exc
    unpickler = RestrictedUnpickler(io.BytesIO(data), encoding="bytes")
    unpickler.source = str(path)
    try:
        return unpickler.load()
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means a corrupt file
        raise DatasetError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); delete the folder "
            "and download the dataset again"
        ) from exc


class CifarSpec:
    """Where and how one CIFAR variant is stored."""

    def __init__(
        self,
        name: str,
        title: str,
        folder: str,
        train_files: tuple[str, ...],
        test_files: tuple[str, ...],
        meta_file: str,
        label_key: bytes,
        names_key: bytes,
        num_classes: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        url: str,
        md5: str,
    ) -> None:
        self.name = name
        self.title = title
        self.folder = folder
        self.train_files = train_files
        self.test_files = test_files
        self.meta_file = meta_file
        self.label_key = label_key
        self.names_key = names_key
        self.num_classes = num_classes
        self.mean = mean
        self.std = std
        self.url = url
        self.md5 = md5

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the folder must hold."""
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        # Per-channel mean/std of the 50k training images (the widely used values).
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        # The CRD/DKD/SDD normalisation (docs/benchmarks: CIFAR-100 protocol).
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def _spec(name: str) -> CifarSpec:
    try:
        return CIFAR_SPECS[name]
    except KeyError:
        raise DatasetError(
            f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_SPECS)}"
        ) from None


def find_cifar_folder(root: str | os.PathLike[str] | None, name: str) -> Path | None:
    """The ``cifar-*-python`` folder under or at ``root`` holding every file, or ``None``."""
    spec = _spec(name)
    root = Path(root) if root is not None else default_data_root()
    for candidate in (root / spec.folder, root):
        if all((candidate / f).is_file() for f in spec.files):
            return candidate
    return None


def _missing_message(spec: CifarSpec, root: Path) -> str:
    return (
        f"{spec.title} not found: expected folder {root / spec.folder} with files "
        f"{', '.join(spec.files)}; pass download=True (needs internet) or download {spec.url} "
        f"(md5 {spec.md5}) and extract it into {root}"
    )


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    if b"data" not in obj or label_key not in obj:
        raise DatasetError(
            f"{path}: missing key b'data' or {label_key!r} (keys: {sorted(map(repr, obj))})"
        )
    data, labels = obj[b"data"], obj[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(f"{path}: b'data' must be a uint8 array N x 3072")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: b'data' has {data.shape[1]} columns, expected 3072")
    try:
        labels_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers") from exc
    if labels_arr.shape != (data.shape[0],):
        raise DatasetError(
            f"{path}: {data.shape[0]} images but {labels_arr.size} labels under {label_key!r}"
        )
    return data, labels_arr


def _read_names(path: Path, key: bytes, num_classes: int) -> list[str] | None:
    meta = restricted_load(path)
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(meta).__name__}")
    names = meta.get(key)
    if names is None or len(names) != num_classes:
        return None
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(
    root: str | os.PathLike[str] | None = None,
    name: str = "cifar100",
    train: bool = True,
    download: bool = False,
) -> ImageTensorDataset:
    """Load a CIFAR split as an :class:`ImageTensorDataset` (``uint8``, ``N x 3 x 32 x 32``, CPU).

    Args:
        root: the folder holding ``cifar-100-python/`` (``cifar-10-batches-py/``), or that
            folder itself; default ``$KDLAB_DATA`` or ``./data``.
        name: ``"cifar100"`` or ``"cifar10"``.
        train: the 50k training split (else the 10k test split).
        download: fetch and extract the official archive (md5-checked) if the files are missing.
    """
    spec = _spec(name)
    root_path = Path(root) if root is not None else default_data_root()
    folder = find_cifar_folder(root_path, name)
    if folder is None and download:
        download_and_extract(spec.url, root_path, spec.md5)
        folder = find_cifar_folder(root_path, name)
    if folder is None:
        raise DatasetError(_missing_message(spec, root_path))

    datas, labels = [], []
    for fname in spec.train_files if train else spec.test_files:
        d, lab = _read_batch(folder / fname, spec.label_key)
        datas.append(d)
        labels.append(lab)
    data = np.concatenate(datas) if len(datas) > 1 else datas[0]
    label_arr = np.concatenate(labels) if len(labels) > 1 else labels[0]
    if label_arr.size and (label_arr.min() < 0 or label_arr.max() >= spec.num_classes):
        raise DatasetError(
            f"{folder}: labels outside [0, {spec.num_classes}) (is this really {spec.title}?)"
        )
    classes = _read_names(folder / spec.meta_file, spec.names_key, spec.num_classes)
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return ImageTensorDataset(
        images=images,
        labels=torch.from_numpy(label_arr),
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
        name=spec.name,
        classes=classes,
    )
