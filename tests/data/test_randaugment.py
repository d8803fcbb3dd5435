"""RandAugment on the device (MLKD's strong view): every op against a plain reference written from
the PIL operation the official code calls (and against PIL itself when it is installed),
determinism of the draws, and the loaders' strong view (independent crop, no effect on the weak
view, mid-epoch resume)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.core.errors import DatasetError
from kdlab.data import DeviceLoader, make_synthetic_dataset
from kdlab.data import randaugment as ra
from kdlab.data.randaugment import (
    OPS,
    RandAugmentDraws,
    StrongViewLoader,
    draw_rand_augment,
    op_magnitude,
    rand_augment,
    rand_augment_normalized,
    strong_view_seed,
)

RNG = np.random.default_rng(0)


def images(b: int, c: int = 3, side: int = 32) -> np.ndarray:
    """Random images, a low-contrast one, a gradient and a two-level one."""
    x = RNG.integers(0, 256, (b, c, side, side), dtype=np.uint8)
    yy, xx = np.mgrid[0:side, 0:side]
    x[1] = x[1] // 5 + 90
    x[2] = ((xx * 3 + yy) % 256).astype(np.uint8)
    x[3] = np.where(xx > side // 2, 200, 10).astype(np.uint8)
    return x


def single_op(name: str, b: int, seed: int = 1) -> RandAugmentDraws:
    """Draws applying only ``name`` (one slot, no Cutout) at random levels."""
    levels = torch.rand((b, 1), generator=torch.Generator().manual_seed(seed))
    return RandAugmentDraws(torch.full((b, 1), OPS.index(name)), levels, torch.zeros(b, 3))


def run_op(name: str, x: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    draws = single_op(name, x.shape[0], seed)
    out = rand_augment(torch.from_numpy(x), draws).numpy()
    return out, op_magnitude(name, draws.levels[:, 0]).numpy()


# ----------------------------------------------------------------------------- the ops
def luma(img: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma as PIL's convert("L"): (19595 R + 38470 G + 7471 B + 0x8000) >> 16."""
    r, g, b = (img[i].astype(np.int64) for i in range(3))
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def blend(degenerate: np.ndarray, img: np.ndarray, f: float) -> np.ndarray:
    """Image.blend for 0 <= f <= 1: (UINT8)(d + (float)f * (x - d)) in C float."""
    d = degenerate.astype(np.float32)
    return np.trunc(d + np.float32(f) * (img.astype(np.float32) - d)).astype(np.uint8)


def test_brightness_color_contrast_against_the_blend_formulas() -> None:
    x = images(8)
    out, v = run_op("brightness", x)
    for i in range(8):
        assert np.array_equal(out[i], blend(np.zeros_like(x[i]), x[i], v[i]))
        assert 0.05 <= v[i] < 0.95
    out, v = run_op("color", x)
    for i in range(8):
        assert np.array_equal(out[i], blend(np.broadcast_to(luma(x[i]), x[i].shape), x[i], v[i]))
    out, v = run_op("contrast", x)
    for i in range(8):
        mean = int(luma(x[i]).mean() + 0.5)
        assert np.array_equal(out[i], blend(np.full_like(x[i], mean), x[i], v[i]))


def test_solarize_and_posterize_against_their_tables() -> None:
    x = images(8)
    out, v = run_op("solarize", x)
    for i in range(8):
        assert 0 <= v[i] < 256
        assert np.array_equal(out[i], np.where(x[i] < v[i], x[i], 255 - x[i]))
    out, v = run_op("posterize", x)
    for i in range(8):
        bits = max(1, int(v[i]))
        assert 4 <= bits <= 7
        assert np.array_equal(out[i], x[i] & (~(2 ** (8 - bits) - 1) & 0xFF))


def test_auto_contrast_and_equalize_against_their_tables() -> None:
    x = images(8)
    x[4, 1] = 77  # a constant channel stays as it is
    out, _ = run_op("auto_contrast", x)
    eq, _ = run_op("equalize", x)
    for i in range(8):
        for ch in range(3):
            a = x[i, ch].astype(np.int64)
            lo, hi = int(a.min()), int(a.max())
            if hi <= lo:
                lut = list(range(256))
            else:
                scale = 255.0 / (hi - lo)
                lut = [min(255, max(0, int(j * scale + -lo * scale))) for j in range(256)]
            assert np.array_equal(out[i, ch], np.array(lut)[a]), (i, ch)
            h = np.bincount(a.ravel(), minlength=256)
            step = (h.sum() - h[hi]) // 255
            if step == 0:
                want = a
            else:
                lut = np.minimum((step // 2 + np.concatenate([[0], np.cumsum(h)[:-1]])) // step,
                                 255)
                want = lut[a]
            assert np.array_equal(eq[i, ch], want), (i, ch)


def test_equalize_clips_its_table_at_255() -> None:
    """step 3 and 257 pixels at the top value: the table's last entry is (1 + 767) // 3 = 256."""
    a = np.concatenate([np.full(257, 255), np.repeat(np.arange(0, 767) % 200, 1)]).astype(np.uint8)
    x = a.reshape(1, 1, 32, 32)
    eq, _ = run_op("equalize", x)
    assert eq.max() == 255 and eq[0, 0].ravel()[0] == 255


def test_sharpness_against_the_smooth_filter() -> None:
    x = images(6)
    out, v = run_op("sharpness", x)
    for i in range(6):
        a = x[i].astype(np.int64)
        smooth = a.copy()
        for y in range(1, 31):
            for xx in range(1, 31):
                s = a[:, y - 1:y + 2, xx - 1:xx + 2].sum(axis=(1, 2)) + 4 * a[:, y, xx]
                smooth[:, y, xx] = np.floor(s / 13 + 0.5)
        assert np.array_equal(out[i], blend(smooth, x[i], v[i]))


def nearest_affine(img: np.ndarray, a: float, b: float, c: float, d: float, e: float,
                   f: float) -> np.ndarray:
    """Output (x, y) = input(floor(a (x+.5) + b (y+.5) + c), floor(d (x+.5) + e (y+.5) + f)),
    black outside: PIL's nearest-neighbour affine sampling at pixel centres."""
    ch, hgt, wid = img.shape
    out = np.zeros_like(img)
    for y in range(hgt):
        for x in range(wid):
            sx = math.floor(a * (x + 0.5) + b * (y + 0.5) + c)
            sy = math.floor(d * (x + 0.5) + e * (y + 0.5) + f)
            if 0 <= sx < wid and 0 <= sy < hgt:
                out[:, y, x] = img[:, sy, sx]
    return out


@pytest.mark.parametrize("name", ["translate_x", "translate_y", "shear_x", "shear_y", "rotate"])
def test_geometric_ops_against_centre_sampling(name: str) -> None:
    """Exact for translations; shears and rotations sample in Pillow's 16.16 fixed point, so a
    pixel sitting on a sampling boundary may differ from the float reference (none in 32x32 here
    for shears; at most a few for rotations)."""
    x = images(6)
    out, v = run_op(name, x, seed=7)
    mismatched = 0
    for i in range(6):
        if name == "translate_x":
            ref = nearest_affine(x[i], 1, 0, v[i] * 32, 0, 1, 0)
        elif name == "translate_y":
            ref = nearest_affine(x[i], 1, 0, 0, 0, 1, v[i] * 32)
        elif name == "shear_x":
            ref = nearest_affine(x[i], 1, v[i], 0, 0, 1, 0)
        elif name == "shear_y":
            ref = nearest_affine(x[i], 1, 0, 0, v[i], 1, 0)
        else:  # Image.rotate(v): counter-clockwise about the centre (16, 16)
            t = -math.radians(v[i] % 360.0)
            cs, sn = math.cos(t), math.sin(t)
            ref = nearest_affine(x[i], cs, sn, cs * -16 + sn * -16 + 16,
                                 -sn, cs, -sn * -16 + cs * -16 + 16)
            assert -30 <= v[i] < 30
        mismatched += int((ref != out[i]).any(axis=0).sum())
    assert mismatched <= (0 if name != "rotate" else 6)


def test_cutout_draws_the_official_rectangle() -> None:
    x = images(16)
    u = torch.rand((16, 3), generator=torch.Generator().manual_seed(3))
    u[0, 0] = 0.0  # no cutout
    draws = RandAugmentDraws(torch.full((16, 1), OPS.index("identity")), torch.zeros(16, 1), u)
    out = rand_augment(torch.from_numpy(x), draws).numpy()
    assert np.array_equal(out[0], x[0])
    for i in range(1, 16):
        v = float(u[i, 0]) * 0.5 * 32
        x0 = int(max(0.0, 32 + (1 - 32) * float(u[i, 1]) - v / 2))
        y0 = int(max(0.0, 32 + (1 - 32) * float(u[i, 2]) - v / 2))
        x1, y1 = int(min(32, x0 + v)), int(min(32, y0 + v))
        want = x[i].copy()
        want[:, y0:y1 + 1, x0:x1 + 1] = np.array([125, 123, 114]).reshape(3, 1, 1)
        assert np.array_equal(out[i], want), i


def test_one_channel_images() -> None:
    """Fashion-MNIST: Color is the identity, Contrast uses the image's own mean, Cutout is 123."""
    x = images(8, c=1, side=28)
    out, _ = run_op("color", x)
    assert np.array_equal(out, x)
    out, v = run_op("contrast", x)
    for i in range(8):
        assert np.array_equal(out[i], blend(np.full_like(x[i], int(x[i].mean() + 0.5)), x[i],
                                            v[i]))
    draws = RandAugmentDraws(torch.full((8, 1), OPS.index("identity")), torch.zeros(8, 1),
                             torch.full((8, 3), 0.9))
    cut = rand_augment(torch.from_numpy(x), draws)
    assert (cut == 123).any() and cut.shape == (8, 1, 28, 28)


PIL_OPS = {
    "auto_contrast": lambda im, v, P: P.ImageOps.autocontrast(im),
    "brightness": lambda im, v, P: P.ImageEnhance.Brightness(im).enhance(v),
    "color": lambda im, v, P: P.ImageEnhance.Color(im).enhance(v),
    "contrast": lambda im, v, P: P.ImageEnhance.Contrast(im).enhance(v),
    "equalize": lambda im, v, P: P.ImageOps.equalize(im),
    "identity": lambda im, v, P: im,
    "posterize": lambda im, v, P: P.ImageOps.posterize(im, max(1, int(v))),
    "rotate": lambda im, v, P: im.rotate(v),
    "sharpness": lambda im, v, P: P.ImageEnhance.Sharpness(im).enhance(v),
    "shear_x": lambda im, v, P: im.transform(im.size, P.Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda im, v, P: im.transform(im.size, P.Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "solarize": lambda im, v, P: P.ImageOps.solarize(im, v),
    "translate_x": lambda im, v, P: im.transform(im.size, P.Image.AFFINE,
                                                  (1, 0, v * im.size[0], 0, 1, 0)),
    "translate_y": lambda im, v, P: im.transform(im.size, P.Image.AFFINE,
                                                  (1, 0, 0, 0, 1, v * im.size[1])),
}


@pytest.mark.parametrize("channels", [3, 1])
def test_the_whole_pipeline_equals_the_official_pil_code(channels: int) -> None:
    """The official RandAugment (two ops, then Cutout) written with PIL, fed the same draws."""
    pil = pytest.importorskip("PIL")
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageEnhance
    import PIL.ImageOps

    def official(img: np.ndarray, names, vals, cut) -> np.ndarray:
        im = (PIL.Image.fromarray(img.transpose(1, 2, 0)) if channels == 3
              else PIL.Image.fromarray(img[0]))
        for name, v in zip(names, vals, strict=True):
            im = PIL_OPS[name](im, v, pil)
        v = cut[0] * 0.5
        if v > 0:
            v = v * im.size[0]
            w, h = im.size
            x0, y0 = w + (1.0 - w) * cut[1], h + (1.0 - h) * cut[2]  # np.random.uniform(w)
            x0, y0 = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
            im = im.copy()
            PIL.ImageDraw.Draw(im).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)),
                                             (125, 123, 114) if channels == 3 else 123)
        a = np.array(im)
        return a.transpose(2, 0, 1) if channels == 3 else a[None]

    b = 96
    x = np.concatenate([images(b // 2, channels), images(b // 2, channels)])
    draws = draw_rand_augment(b, torch.Generator().manual_seed(4))
    draws = draws._replace(ops=torch.cat([torch.arange(len(OPS)).repeat(7)[:b, None],
                                          draws.ops[:, 1:]], dim=1))  # every op in slot 1
    out = rand_augment(torch.from_numpy(x), draws).numpy()
    for i in range(b):
        names = [OPS[int(k)] for k in draws.ops[i]]
        vals = [float(op_magnitude(n, draws.levels[i, j:j + 1])[0]) for j, n in enumerate(names)]
        ref = official(x[i], names, vals, draws.cutout[i].double().tolist())
        assert np.array_equal(ref, out[i]), (i, names, vals)


# ----------------------------------------------------------------------------- draws
def test_draws_are_deterministic_and_differ_between_steps() -> None:
    def draws(seed: int, epoch: int, step: int) -> RandAugmentDraws:
        g = torch.Generator().manual_seed(strong_view_seed(seed, epoch, step))
        return draw_rand_augment(16, g)

    a, b = draws(0, 1, 5), draws(0, 1, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for other in (draws(0, 1, 6), draws(0, 2, 5), draws(1, 1, 5)):
        assert not torch.equal(a.levels, other.levels)
    assert a.ops.dtype == torch.int64 and a.ops.shape == (16, 2)
    assert int(a.ops.min()) >= 0 and int(a.ops.max()) < len(OPS)
    assert strong_view_seed(0, 1) != strong_view_seed(0, 1, 0)


def test_output_shape_dtype_device_and_errors() -> None:
    x = torch.from_numpy(images(5))
    d = draw_rand_augment(5, torch.Generator().manual_seed(0))
    out = rand_augment(x, d)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
    assert torch.equal(out, rand_augment(x, d))  # a function of the draws
    assert not torch.equal(out, x)
    with pytest.raises(DatasetError, match="uint8"):
        rand_augment(x.float(), d)
    with pytest.raises(DatasetError, match="1- or 3-channel"):
        rand_augment(torch.zeros(5, 2, 8, 8, dtype=torch.uint8), d)
    with pytest.raises(DatasetError, match="draws"):
        rand_augment(x[:3], d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_equals_cpu() -> None:
    x = torch.from_numpy(images(64))
    d = draw_rand_augment(64, torch.Generator().manual_seed(0))
    out = rand_augment(x.cuda(), d)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), rand_augment(x, d))


def test_normalized_wrapper_round_trips_and_augments() -> None:
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    x = torch.from_numpy(images(6))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    z = (x.float() / 255 - m) / s
    ident = RandAugmentDraws(torch.full((6, 2), OPS.index("identity")), torch.zeros(6, 2),
                             torch.zeros(6, 3))
    torch.testing.assert_close(rand_augment_normalized(z, ident, mean, std), z, rtol=0,
                               atol=1e-6)
    d = draw_rand_augment(6, torch.Generator().manual_seed(1))
    want = (rand_augment(x, d).float() / 255 - m) / s
    torch.testing.assert_close(rand_augment_normalized(z, d, mean, std), want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the loaders
def loader(strong: bool, **kw) -> DeviceLoader:
    ds = make_synthetic_dataset(40, num_classes=4, size=8, seed=0, **kw)
    out = DeviceLoader(ds, batch_size=8, train=True, seed=5)
    if strong:
        out.set_views(("weak", "strong"))
    return out


def test_the_strong_view_leaves_the_weak_batches_and_the_global_rng_alone() -> None:
    plain, two = loader(False), loader(True)
    for ld in (plain, two):
        ld.set_epoch(2)
    state = torch.get_rng_state()
    a, b = list(plain), list(two)
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(a, b, strict=True):
        assert x.strong is None and y.strong is not None
        assert torch.equal(x.images, y.images) and torch.equal(x.index, y.index)
        assert y.strong.shape == y.images.shape and y.strong.dtype == y.images.dtype
        assert not torch.equal(y.strong, y.images)


def test_the_strong_view_is_its_own_crop_then_randaugment() -> None:
    ld = loader(True)
    ld.set_epoch(3)
    batches = list(ld)
    (dy, dx, flip), draws = ld.strong_plan()
    weak_plan = ld.plan()
    assert not (torch.equal(dy, weak_plan.dy) and torch.equal(dx, weak_plan.dx))
    ds = ld.dataset
    mean = torch.tensor(ds.mean).view(3, 1, 1) * 255
    inv = 1 / (torch.tensor(ds.std).view(3, 1, 1) * 255)
    for pos in (0, 9, 17, 39):
        batch, row = batches[pos // 8], pos % 8
        img = F.pad(ds.images[int(weak_plan.index[pos])], (4, 4, 4, 4))
        crop = img[:, int(dy[pos]):int(dy[pos]) + 8, int(dx[pos]):int(dx[pos]) + 8]
        if int(flip[pos]):
            crop = crop.flip(-1)
        aug = rand_augment(crop[None], draws.take(slice(pos, pos + 1)))[0]
        torch.testing.assert_close(batch.strong[row], (aug.float() - mean) * inv, rtol=0,
                                   atol=1e-6)


def test_strong_view_is_deterministic_per_epoch_and_resumes_mid_epoch() -> None:
    ld, again = loader(True), loader(True)
    ld.set_epoch(4)
    again.set_epoch(4)
    full, same = list(ld), list(again)
    for a, b in zip(full, same, strict=True):
        assert torch.equal(a.strong, b.strong)
    ld.set_epoch(5)
    assert not torch.equal(list(ld)[0].strong, full[0].strong)
    ld.set_epoch(4, start_batch=2)
    tail = list(ld)
    for a, b in zip(full[2:], tail, strict=True):
        assert torch.equal(a.strong, b.strong) and torch.equal(a.images, b.images)


def test_one_channel_loader_and_view_errors() -> None:
    ld = loader(True, channels=1)
    ld.set_epoch(1)
    batch = next(iter(ld))
    assert batch.strong.shape == batch.images.shape == (8, 1, 8, 8)
    with pytest.raises(DatasetError, match="unknown view"):
        ld.set_views(("weak", "blurred"))
    evaluation = DeviceLoader(ld.dataset, batch_size=8, train=False)
    with pytest.raises(DatasetError, match="augmenting"):
        evaluation.set_views(("weak", "strong"))


def test_strong_view_loader_wraps_any_loader_deterministically() -> None:
    """The streamed datasets' path: RandAugment of the batch's own crop, seeded per step."""
    inner = loader(False)
    ds = inner.dataset
    wrapped = StrongViewLoader(inner, ds.mean, ds.std, seed=3)
    assert len(wrapped) == len(inner) and wrapped.num_samples == inner.num_samples
    wrapped.set_epoch(1)
    full = list(wrapped)
    wrapped.set_epoch(1, start_batch=3)
    tail = list(wrapped)
    assert len(tail) == len(full) - 3
    for a, b in zip(full[3:], tail, strict=True):
        assert torch.equal(a.strong, b.strong) and torch.equal(a.images, b.images)
    g = torch.Generator().manual_seed(strong_view_seed(3, 1, 0))
    want = rand_augment_normalized(full[0].images, draw_rand_augment(8, g), ds.mean, ds.std)
    assert torch.equal(full[0].strong, want)


def test_every_op_is_listed_with_its_official_range() -> None:
    assert len(OPS) == 14 and set(ra.RANGES) == set(OPS)
    assert ra.RANGES["rotate"] == (-30.0, 30.0) and ra.RANGES["posterize"] == (4.0, 8.0)
    assert ra.RANGES["brightness"] == (0.05, 0.95) and ra.RANGES["solarize"] == (0.0, 256.0)
    assert ra.NUM_OPS == 2 and ra.CUTOUT_FILL == (125, 123, 114)
