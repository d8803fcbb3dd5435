"""Time kdlab's pure-PyTorch detection kernels on this CPU: roi_align (forward + backward) and nms.

roi_align: 512 RoIs (2 images x 256) over 64-channel maps of an FPN at 256-px input (64x64, 32x32,
16x16 and 8x8), 7x7 output, sampling_ratio 2 (Faster R-CNN's setting) and adaptive (0). Beside
kdlab's kernel (a weighted ``embedding_bag`` over the channels-last map) it times the
``F.grid_sample`` formulation (coordinates clamped into the map, ``align_corners=True``, times the
validity mask, then a mean over the bin's samples), written here only for this comparison.
kdlab's kernel has two paths (issue 26): where a gradient is needed and the map has at most
``vision_ops.DENSE_MAX_PIXELS`` pixels, a separable matrix product (``dense``), else the bag
(``bag``); both are timed on every map (``--out 14`` adds SDD's 14x14 region pooling), and a
128x128 map checks the size limit. nms: 2000 random boxes, and batched_nms over 2000 boxes in
80 classes.

    .venv/bin/python benchmarks/detection_ops.py [--repeat 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.core import vision_ops
from kdlab.core.vision_ops import batched_nms, nms, roi_align


def grid_sample_roi_align(input: Tensor, rois: Tensor, out: int, scale: float, grid: int,
                          aligned: bool) -> Tensor:
    """RoIAlign with a fixed ``grid x grid`` sampling through ``F.grid_sample`` (comparison)."""
    n, ch, h, w = input.shape
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    rw = rois[:, 3] * scale - offset - x1
    rh = rois[:, 4] * scale - offset - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    steps = (torch.arange(out * grid, dtype=input.dtype) // grid
             + ((torch.arange(out * grid) % grid).to(input.dtype) + 0.5) / grid)
    ys = y1[:, None] + steps[None, :] * (rh / out)[:, None]   # K, out*grid
    xs = x1[:, None] + steps[None, :] * (rw / out)[:, None]
    valid = (((ys >= -1) & (ys <= h))[:, :, None] & ((xs >= -1) & (xs <= w))[:, None, :])
    gy = ys.clamp(0, h - 1) / (h - 1) * 2 - 1
    gx = xs.clamp(0, w - 1) / (w - 1) * 2 - 1
    result = input.new_zeros((rois.shape[0], ch, out, out))
    batch = rois[:, 0].long()
    pieces = []
    for b in range(n):
        sel = torch.nonzero(batch == b).squeeze(1)
        k = sel.numel()
        grid_xy = torch.stack(torch.broadcast_tensors(gx[sel][:, None, :], gy[sel][:, :, None]),
                              dim=-1)  # k, out*grid, out*grid, 2
        sampled = F.grid_sample(input[b:b + 1], grid_xy.reshape(1, k * out * grid, out * grid, 2),
                                mode="bilinear", padding_mode="border", align_corners=True)
        sampled = sampled.reshape(ch, k, out * grid, out * grid).transpose(0, 1)
        sampled = sampled * valid[sel][:, None].to(input.dtype)
        pieces.append((sel, F.avg_pool2d(sampled, grid)))
    for sel, val in pieces:
        result = result.index_copy(0, sel, val)
    return result


def _time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def _rois(k: int, image: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * image * 0.8
    wh = torch.rand(k, 2, generator=g) * image * 0.4 + 4
    batch = (torch.arange(k) % 2).float()[:, None]
    return torch.cat([batch, xy, (xy + wh).clamp(max=image)], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: keep default)")
    parser.add_argument("--out", type=int, default=14, help="second roi_align output size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rois = _rois(512, 256, 0)
    rows: list[tuple[str, str, float]] = []
    limit = vision_ops.DENSE_MAX_PIXELS

    def path(dense: bool, fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            vision_ops.DENSE_MAX_PIXELS = limit if dense else 0
            try:
                return fn()
            finally:
                vision_ops.DENSE_MAX_PIXELS = limit
        return run

    for size in (128, 64, 32, 16, 8):
        scale = size / 256
        feat = torch.randn(2, 64, size, size, requires_grad=True)

        def fwd_bwd(fn: Callable[[], Tensor], f: Tensor = feat) -> Callable[[], None]:
            def run() -> None:
                f.grad = None
                fn().sum().backward()
            return run

        for out in sorted({7, args.out}):
            cases: list[tuple[str, Callable[[], Tensor]]] = []
            for sr in (2, 0):
                for dense in (True, False):
                    cases.append((f"kdlab {'dense' if dense else 'bag'} sr={sr}",
                                  path(dense, lambda s=scale, f=feat, o=out, r=sr:
                                       roi_align(f, rois, o, s, r, False))))
            if out == 7:
                cases.append(("grid_sample sr=2", lambda s=scale, f=feat:
                              grid_sample_roi_align(f, rois, 7, s, 2, False)))
            for name, fn in cases:
                rows.append((f"roi_align {size}x{size} -> {out}x{out}", name,
                             _time(fwd_bwd(fn), args.repeat)))
        dense_out = path(True, lambda s=scale, f=feat: roi_align(f, rois, 7, s, 2, False))()
        with torch.no_grad():
            bag_out = roi_align(feat, rois, 7, scale, 2, False)
        rows.append((f"roi_align {size}x{size} -> 7x7", "max |dense - bag|",
                     (dense_out - bag_out).abs().max().item()))
    check = torch.randn(2, 64, 32, 32)
    err = (roi_align(check, rois, 7, 0.125, 2, False)
           - grid_sample_roi_align(check, rois, 7, 0.125, 2, False)).abs().max().item()
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(2000, 2, generator=g) * 256
    boxes = torch.cat([xy, xy + torch.rand(2000, 2, generator=g) * 64 + 1], 1)
    scores = torch.rand(2000, generator=g)
    classes = torch.randint(0, 80, (2000,), generator=g)
    rows.append(("nms 2000 boxes", "kdlab", _time(lambda: nms(boxes, scores, 0.7), args.repeat)))
    rows.append(("batched_nms 2000 boxes / 80 cls", "kdlab",
                 _time(lambda: batched_nms(boxes, scores, classes, 0.5), args.repeat)))
    width = max(len(r[0]) for r in rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeat}; roi_align: 512 RoIs, 64 ch, 7x7, forward + backward")
    print(f"{'op':<{width}}  {'implementation':<18}  {'ms':>9}")
    for op, impl, ms in rows:
        print(f"{op:<{width}}  {impl:<18}  {ms:9.1f}" if ms >= 1e-3 else
              f"{op:<{width}}  {impl:<18}  {ms:9.1e}")
    print(f"max |kdlab - grid_sample| at 32x32, sr=2: {err:.2e}")


if __name__ == "__main__":
    main()
