"""Throughput of the stream loader (img/s) on a generated ImageNet-layout folder.

Writes ``N`` JPEGs of 500x375 (the typical ILSVRC size) into ``<tmp>/train/<wnid>/`` and times
one full training epoch (decode + random-resized-crop 224 + flip + uint8 collate) with 0, 1 and
2 workers. The first batch is excluded (worker start-up).

    .venv/bin/python benchmarks/loader_imagenet.py [--images 320] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from kdlab.data.stream import load_stream_dataset, make_stream_loader


def make_folder(root: Path, n_images: int, n_classes: int = 10) -> None:
    """Smooth random images (JPEG-compressible like photos) at 500x375, quality 90."""
    rng = np.random.default_rng(0)
    for i in range(n_images):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(-12, 13, (375, 500, 3))
        arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        d = root / "train" / f"n{i % n_classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"img_{i:05d}.JPEG", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, args.images)
        ds = load_stream_dataset("imagenet", root, train=True)
        print(f"{len(ds)} images 500x375 JPEG, batch {args.batch}, cpu cores {os.cpu_count()}")
        for workers in args.workers:
            loader = make_stream_loader(ds, args.batch, train=True, num_workers=workers)
            it = iter(loader)
            next(it)
            t0 = time.perf_counter()
            n = sum(len(b.labels) for b in it)
            dt = time.perf_counter() - t0
            print(f"workers={workers}: {n / dt:7.1f} img/s ({n} images in {dt:.2f} s)")


if __name__ == "__main__":
    main()
