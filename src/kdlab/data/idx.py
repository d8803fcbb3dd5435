"""Reading and writing IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

An IDX file is a 4-byte big-endian magic number ``0x00 0x00 <type> <ndim>`` followed by
``ndim`` big-endian ``uint32`` dimensions and the data in C order. MNIST-style datasets use
unsigned bytes (type ``0x08``): images have magic ``0x00000803`` (``N x rows x cols``) and labels
``0x00000801`` (``N``).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from kdlab.core.errors import DatasetError

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "write_idx_file",
]

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip (detected by its magic bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"{path} is a truncated or corrupt gzip file ({exc}); download it again"
            ) from exc
    return raw


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file and check its magic number and size.

    Raises :class:`DatasetError` naming the file for a wrong magic number, truncated data or
    trailing bytes.
    """
    path = Path(path)
    raw = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise DatasetError(f"{path} is truncated: {len(raw)} bytes, no IDX header")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DatasetError(
            f"{path}: wrong IDX magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'} file of unsigned bytes)"
        )
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: header needs {header} bytes, got {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "longer than its header says"
        raise DatasetError(
            f"{path} is {what}: header {'x'.join(map(str, dims))} needs {expected} data bytes, "
            f"found {got}; download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an images file (magic ``0x00000803``) as a ``uint8`` array ``N x rows x cols``."""
    return read_idx(path, IDX_IMAGES_MAGIC)


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a labels file (magic ``0x00000801``) as a ``uint8`` array of length ``N``."""
    return read_idx(path, IDX_LABELS_MAGIC)


def write_idx_file(path: str | os.PathLike[str], array: np.ndarray, gz: bool = False) -> Path:
    """Write a ``uint8`` array (1-D labels or 3-D images) as an IDX file, gzip'd if ``gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim not in (1, 3):
        raise ValueError(f"IDX writer expects 1-D labels or 3-D images, got {array.ndim}-D")
    header = struct.pack(f">I{array.ndim}I", 0x00000800 | array.ndim, *array.shape)
    payload = header + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path
