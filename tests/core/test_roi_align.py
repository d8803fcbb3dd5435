"""kdlab's pure-PyTorch roi_align against torchvision's compiled kernel, followed loop by loop.

The reference below transcribes ``torchvision/csrc/ops/cpu/roi_align_kernel.cpp`` (forward with
``pre_calc_for_bilinear_interpolate`` from ``roi_align_common.h``, and
``roi_align_backward_kernel_impl`` with ``bilinear_interpolate_gradient``) in float64 numpy: one
RoI, one output cell, one sample at a time. It does not use kdlab.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab.core.vision_ops import DetectionOpError, roi_align


def _roi_params(roi: np.ndarray, scale: float, ph: int, pw: int, sr: int, aligned: bool
                ) -> tuple[int, float, float, float, float, int, int]:
    b = int(roi[0])
    offset = 0.5 if aligned else 0.0
    sw = roi[1] * scale - offset
    sh = roi[2] * scale - offset
    ew = roi[3] * scale - offset
    eh = roi[4] * scale - offset
    rw = ew - sw
    rh = eh - sh
    if not aligned:
        rw = max(rw, 1.0)
        rh = max(rh, 1.0)
    bh = rh / ph
    bw = rw / pw
    gh = sr if sr > 0 else math.ceil(rh / ph)
    gw = sr if sr > 0 else math.ceil(rw / pw)
    return b, sh, sw, bh, bw, gh, gw


def _bilinear(height: int, width: int, y: float, x: float
              ) -> tuple[tuple[int, int, int, int], tuple[float, float, float, float]] | None:
    """``(y_low, y_high, x_low, x_high), (w1..w4)``, or None for an empty sample."""
    if not (-1.0 <= y <= height and -1.0 <= x <= width):
        return None
    if y <= 0:
        y = 0.0
    if x <= 0:
        x = 0.0
    y_low = int(y)
    x_low = int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly = y - y_low
    lx = x - x_low
    hy = 1.0 - ly
    hx = 1.0 - lx
    return (y_low, y_high, x_low, x_high), (hy * hx, hy * lx, ly * hx, ly * lx)


def _samples(sh: float, sw: float, bh: float, bw: float, gh: int, gw: int, i: int, j: int):
    for iy in range(gh):
        y = sh + i * bh + (iy + 0.5) * bh / gh
        for ix in range(gw):
            x = sw + j * bw + (ix + 0.5) * bw / gw
            yield y, x


def ref_forward(feat: np.ndarray, rois: np.ndarray, scale: float, ph: int, pw: int, sr: int,
                aligned: bool) -> np.ndarray:
    _, ch, height, width = feat.shape
    out = np.zeros((rois.shape[0], ch, ph, pw))
    for n in range(rois.shape[0]):
        b, sh, sw, bh, bw, gh, gw = _roi_params(rois[n], scale, ph, pw, sr, aligned)
        count = max(gh * gw, 1)
        for i in range(ph):
            for j in range(pw):
                val = np.zeros(ch)
                for y, x in _samples(sh, sw, bh, bw, gh, gw, i, j):
                    tap = _bilinear(height, width, y, x)
                    if tap is None:
                        continue
                    (yl, yh, xl, xh), (w1, w2, w3, w4) = tap
                    f = feat[b]
                    val += w1 * f[:, yl, xl] + w2 * f[:, yl, xh] + w3 * f[:, yh, xl] + \
                        w4 * f[:, yh, xh]
                out[n, :, i, j] = val / count
    return out


def ref_backward(grad_out: np.ndarray, rois: np.ndarray, shape: tuple[int, ...], scale: float,
                 ph: int, pw: int, sr: int, aligned: bool) -> np.ndarray:
    grad_in = np.zeros(shape)
    height, width = shape[2], shape[3]
    for n in range(rois.shape[0]):
        b, sh, sw, bh, bw, gh, gw = _roi_params(rois[n], scale, ph, pw, sr, aligned)
        count = gh * gw
        for i in range(ph):
            for j in range(pw):
                g = grad_out[n, :, i, j]
                for y, x in _samples(sh, sw, bh, bw, gh, gw, i, j):
                    tap = _bilinear(height, width, y, x)
                    if tap is None:
                        continue
                    (yl, yh, xl, xh), (w1, w2, w3, w4) = tap
                    grad_in[b, :, yl, xl] += g * w1 / count
                    grad_in[b, :, yl, xh] += g * w2 / count
                    grad_in[b, :, yh, xl] += g * w3 / count
                    grad_in[b, :, yh, xh] += g * w4 / count
    return grad_in


H, W = 12, 16  # feature map size at spatial_scale 1; boxes below are in image pixels


def _boxes(scale: float) -> torch.Tensor:
    """Image-space boxes for a 2-image batch whose maps are ``H x W`` after ``scale``."""
    s = 1.0 / scale
    g = torch.Generator().manual_seed(3)
    inside = torch.rand(6, 2, generator=g) * torch.tensor([W - 6, H - 6]) + 0.3
    size = torch.rand(6, 2, generator=g) * 5 + 0.7
    random_inside = torch.cat([inside, inside + size], 1)
    special = torch.tensor([
        [-3.3, -2.7, 5.1, 4.2],                    # crosses the top-left border
        [W - 4.17, H - 3.93, W + 2.61, H + 3.37],     # crosses the bottom-right border
        [-0.8, 2.2, W + 0.7, H - 1.1],            # crosses left and right
        [1.7, -0.6, 6.4, H + 0.9],                # crosses top and bottom
        [-9.5, -8.4, -3.2, -2.9],                 # fully outside (top-left)
        [W + 1.6, 2.3, W + 7.7, 5.9],             # fully outside (right)
        [4.3, 3.1, 4.3, 8.6],                     # degenerate: x1 == x2
        [5.2, 6.7, 9.9, 6.7],                     # degenerate: y1 == y2
        [7.41, 5.13, 7.52, 5.2],                  # tiny
        [-0.9, -0.95, W - 0.1, H + 0.95],         # whole map, near the -1 / H limits
        [2.2, 1.4, W - 1.3, H - 0.6],             # big: adaptive grid > 1
    ])
    xyxy = torch.cat([random_inside, special]) * s
    batch = (torch.arange(xyxy.shape[0]) % 2).to(xyxy.dtype)[:, None]
    return torch.cat([batch, xyxy], 1)


def _run_both(scale: float, sr: int, aligned: bool, out: tuple[int, int],
              dtype: torch.dtype = torch.float32) -> None:
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    rois = _boxes(scale).to(torch.float64)
    x = feat.to(dtype).clone().requires_grad_(True)
    y = roi_align(x, rois.to(dtype), out, spatial_scale=scale, sampling_ratio=sr, aligned=aligned)
    upstream = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * upstream.to(dtype)).sum().backward()
    fwd = ref_forward(feat.numpy(), rois.numpy(), scale, out[0], out[1], sr, aligned)
    bwd = ref_backward(upstream.numpy(), rois.numpy(), tuple(feat.shape), scale, out[0], out[1],
                       sr, aligned)
    assert y.shape == fwd.shape and y.dtype == dtype
    np.testing.assert_allclose(y.detach().double().numpy(), fwd, atol=1e-4, rtol=0)
    assert x.grad is not None
    np.testing.assert_allclose(x.grad.double().numpy(), bwd, atol=1e-4, rtol=0)
    assert np.abs(fwd).sum() > 0 and np.abs(bwd).sum() > 0


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [2, 0, -1, 1])
@pytest.mark.parametrize("scale", [1.0, 0.25, 0.125])
def test_matches_compiled_kernel(scale: float, sr: int, aligned: bool) -> None:
    _run_both(scale, sr, aligned, (3, 2))


@pytest.mark.parametrize("aligned", [False, True])
def test_square_output_and_float64(aligned: bool) -> None:
    _run_both(0.5, 0, aligned, (4, 4), dtype=torch.float64)


def test_border_samples_follow_the_kernel_not_the_python_fallback() -> None:
    # One RoI whose samples sit in (-1, 0) and in (H-1, H]: the kernel clamps them (counted,
    # full weight); samples beyond -1 / H contribute zero but still count in the average.
    feat = torch.arange(1.0, 1.0 + 3 * 4).reshape(1, 1, 3, 4)
    inside_band = torch.tensor([[0.0, -0.9, -0.9, 3.9, 2.9]])  # samples at -0.4 and 2.4
    y = roi_align(feat, inside_band, (1, 1), sampling_ratio=2, aligned=False)
    ref = ref_forward(feat.double().numpy(), inside_band.double().numpy(), 1.0, 1, 1, 2, False)
    assert y.item() == pytest.approx(ref.item(), abs=1e-6)
    beyond = torch.tensor([[0.0, -3.0, -3.0, 1.0, 1.0]])  # samples at -2 (dropped) and 0
    y2 = roi_align(feat, beyond, (1, 1), sampling_ratio=2, aligned=False)
    assert y2.item() == pytest.approx(feat[0, 0, 0, 0].item() / 4, abs=1e-6)


def test_list_of_boxes_equals_batch_index_format() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 10, 9, generator=g)
    rois = _boxes(1.0)
    rois = rois[rois[:, 1] < 9]
    rois[:, 0] = torch.arange(rois.shape[0]) % 3
    as_list = [rois[rois[:, 0] == i, 1:] for i in range(3)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(3)])
    a = roi_align(x, rois, (2, 3), 0.5, 0, True)
    b = roi_align(x, as_list, (2, 3), 0.5, 0, True)
    torch.testing.assert_close(b, a[order], rtol=0, atol=0)


def test_each_roi_is_independent_of_the_others() -> None:
    # Grouping by adaptive grid size must not mix RoIs up: one RoI at a time gives the same rows.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, H, W, generator=g)
    rois = _boxes(0.5)
    full = roi_align(x, rois, 3, 0.5, -1, False)
    for k in range(rois.shape[0]):
        torch.testing.assert_close(roi_align(x, rois[k:k + 1], 3, 0.5, -1, False), full[k:k + 1],
                                   rtol=1e-6, atol=1e-6)


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.6, 4.1, 3.7], [1, -1.4, 2.2, 6.6, 5.4],
                         [1, 1.1, 1.2, 2.3, 2.9]], dtype=torch.float64)
    for sr, aligned in ((2, False), (0, True)):
        assert torch.autograd.gradcheck(
            lambda t, sr=sr, aligned=aligned: roi_align(t, rois, (2, 3), 1.0, sr, aligned), (x,))


def test_no_gradient_to_boxes() -> None:
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 1.2, 1.3, 5.4, 6.1]], requires_grad=True)
    roi_align(x, rois, 2, 1.0, 2).sum().backward()
    assert rois.grad is None and x.grad is not None


def test_empty_boxes_give_empty_output_that_backprops() -> None:
    x = torch.randn(2, 5, 8, 8, requires_grad=True)
    for boxes in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]):
        y = roi_align(x, boxes, (7, 5), 0.5, 2)
        assert y.shape == (0, 5, 7, 5)
        y.sum().backward()
        assert x.grad is not None and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computed_in_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, H, W, generator=g)
    rois = _boxes(1.0)
    want = roi_align(x.to(dtype).float(), rois, 3, 1.0, 2, True)
    got = roi_align(x.to(dtype), rois.to(dtype), 3, 1.0, 2, True)
    assert got.dtype == dtype
    # only the boxes' and the output's rounding to `dtype` separate the two
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_autocast_returns_input_dtype() -> None:
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, 1.2, 1.3, 5.4, 6.1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = roi_align(x, rois, 2, 1.0, 2)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, roi_align(x, rois, 2, 1.0, 2), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [
    dict(input=torch.zeros(2, 8, 8)),
    dict(boxes=torch.zeros(3, 4)),
    dict(boxes=[torch.zeros(3, 5)]),
    dict(output_size=(2, 3, 4)),
    dict(output_size=0),
])
def test_bad_shapes_raise(bad: dict) -> None:
    args = dict(input=torch.zeros(1, 2, 8, 8), boxes=torch.zeros(1, 5), output_size=2)
    args.update(bad)
    with pytest.raises(DetectionOpError):
        roi_align(args["input"], args["boxes"], args["output_size"])
