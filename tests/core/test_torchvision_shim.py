"""torchvision's detection ops and models running on kdlab's kernels
(import_torchvision_for_detection)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

import pytest
import torch

from kdlab.core import vision_ops as K
from kdlab.core.errors import ModelError
from kdlab.core.torchvision_shim import import_torchvision_for_detection, ops_backend

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_tv = pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")


def _boxes(n: int, seed: int, size: float = 60.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 0.5
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g)


@pytest.fixture(scope="module")
def tv():
    if not HAS_TORCHVISION:
        pytest.skip("torchvision is not installed")
    try:
        return import_torchvision_for_detection()
    except ModelError as exc:  # e.g. KDLAB_TORCHVISION_SHIM=off where its ops do not load
        pytest.skip(f"torchvision unusable for detection here: {exc}")


@needs_tv
def test_import_is_idempotent_and_reports_backend(tv) -> None:
    assert import_torchvision_for_detection() is tv  # a second call is a no-op
    assert sys.modules["torchvision"] is tv
    info = ops_backend()
    assert info["torchvision"] == tv.__version__
    want_coco = (importlib.metadata.version("pycocotools")
                 if importlib.util.find_spec("pycocotools") else "not installed")
    assert info["pycocotools"] == want_coco
    # the compiled library defines the backward op; kdlab's install defines only the forward ops
    kdlab_serves = not hasattr(torch.ops.torchvision, "_roi_align_backward")
    expected = "kdlab (pure PyTorch)" if kdlab_serves else "torchvision (compiled)"
    assert info["nms"] == expected and info["roi_align"] == expected


@needs_tv
def test_nms_and_batched_nms_equal_kdlab(tv) -> None:
    for seed in range(3):
        boxes, scores = _boxes(300, seed)
        idxs = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(seed))
        keep = tv.ops.nms(boxes, scores, 0.5)
        assert torch.equal(keep, K.nms(boxes, scores, 0.5))
        assert 0 < keep.numel() < 300
        assert torch.equal(tv.ops.batched_nms(boxes, scores, idxs, 0.4),
                           K.batched_nms(boxes, scores, idxs, 0.4))
    # more than 4000 boxes: torchvision loops per class (_batched_nms_vanilla), same result
    boxes, scores = _boxes(4100, 7, size=400.0)
    idxs = torch.randint(0, 3, (4100,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(tv.ops.batched_nms(boxes, scores, idxs, 0.5),
                       K.batched_nms(boxes, scores, idxs, 0.5))


@needs_tv
def test_roi_align_and_module_equal_kdlab_with_gradient(tv) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 20, generator=g, requires_grad=True)
    boxes, _ = _boxes(12, 1)
    rois = torch.cat([(torch.arange(12) % 2).float()[:, None], boxes], 1)
    ours = K.roi_align(x, rois, (3, 4), 0.25, 0, True)
    torch.testing.assert_close(tv.ops.roi_align(x, rois, (3, 4), 0.25, 0, True), ours,
                               rtol=0, atol=0)
    module = tv.ops.RoIAlign((3, 4), spatial_scale=0.25, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(module(x, rois), ours, rtol=0, atol=0)
    as_list = [boxes[0::2], boxes[1::2]]
    torch.testing.assert_close(tv.ops.roi_align(x, as_list, (3, 4), 0.25, 0, True),
                               K.roi_align(x, as_list, (3, 4), 0.25, 0, True), rtol=0, atol=0)
    y = torch.ops.torchvision.roi_align(x, rois, 0.25, 3, 4, 0, True)
    upstream = torch.randn(y.shape, generator=g)
    (grad,) = torch.autograd.grad((y * upstream).sum(), x)
    (want,) = torch.autograd.grad((ours * upstream).sum(), x)
    torch.testing.assert_close(grad, want)
    assert grad.abs().sum() > 0


@needs_tv
def test_multiscale_roi_align_uses_kdlab_levels(tv) -> None:
    g = torch.Generator().manual_seed(2)
    feats = {"0": torch.randn(2, 8, 32, 32, generator=g, requires_grad=True),
             "1": torch.randn(2, 8, 16, 16, generator=g, requires_grad=True)}
    pooler = tv.ops.MultiScaleRoIAlign(["0", "1"], output_size=5, sampling_ratio=2)
    small = torch.tensor([[4.0, 4.0, 20.0, 24.0]])
    big = torch.tensor([[0.0, 0.0, 120.0, 127.0]])
    proposals = [torch.cat([small, big]), torch.cat([big, small])]
    out = pooler(feats, proposals, [(128, 128), (128, 128)])
    assert out.shape == (4, 8, 5, 5)
    # scale 1/4 for level "0" (32 px of 128); box sizes map small -> "0" and big -> "1"
    want_small = K.roi_align(feats["0"], [small, small[:0]], 5, 0.25, 2)
    want_big = K.roi_align(feats["1"], [big, big[:0]], 5, 0.125, 2)
    torch.testing.assert_close(out[0:1], want_small)
    torch.testing.assert_close(out[1:2], want_big)
    out.sum().backward()
    assert feats["0"].grad.abs().sum() > 0 and feats["1"].grad.abs().sum() > 0


@needs_tv
def test_faster_rcnn_trains_and_evaluates(tv) -> None:
    torch.manual_seed(0)
    model = tv.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=96,
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=30, box_batch_size_per_image=32)
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 40.0, 90.0, 75.0]]),
                "labels": torch.tensor([2, 1])}]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    opt.zero_grad()
    total.backward()
    head = model.roi_heads.box_head.fc6.weight.grad  # reached only through roi_align
    assert head is not None and head.abs().sum() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0]
        assert det["labels"].dtype == torch.int64


def test_missing_torchvision_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdlab.core.torchvision_shim as tvo

    monkeypatch.setitem(tvo._STATE, "module", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ModuleNotFoundError
    with pytest.raises(ModelError, match=r"pip install -e '\.\[detection\]'.*torch "):
        tvo.import_torchvision_for_detection()
    with pytest.raises(ModuleNotFoundError):  # the plain import leaves the words to its caller
        tvo.import_torchvision()
    monkeypatch.setattr(tvo, "_installed_version", lambda dist: "not installed")
    assert tvo.ops_backend() == {"torchvision": "not installed", "pycocotools": "not installed"}


@needs_tv
def test_compiled_ops_need_the_backward_operator(tv) -> None:
    # A shim that only flips _has_ops() (no C++ roi_align backward) must not count as compiled,
    # and a missing _has_ops() never does.
    import types

    import kdlab.core.torchvision_shim as tvo

    def fake(flag: bool) -> types.ModuleType:
        mod = types.ModuleType("fake_tv")
        mod.extension = types.SimpleNamespace(_has_ops=lambda: flag)  # type: ignore[attr-defined]
        return mod

    has_backward = hasattr(torch.ops.torchvision, "_roi_align_backward")
    assert tvo._compiled_ops(fake(True)) is has_backward
    assert tvo._compiled_ops(fake(False)) is False


@needs_tv
def test_other_ops_keep_torchvisions_own_error(tv) -> None:
    """Only nms and roi_align are claimed: an op kdlab does not serve fails as it would without
    the shim, with torchvision's own "Couldn't load custom C++ ops"."""
    import kdlab.core.torchvision_shim as tvo

    if not tvo.shim_state()["installed"]:
        pytest.skip("torchvision's compiled ops load here: nothing is replaced")
    assert tv.extension._has_ops() is False  # torchvision's own flag is left as it was
    x = torch.rand(1, 2, 8, 8)
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        tv.ops.roi_pool(x, rois, 2)
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        tv.ops.deform_conv2d(torch.rand(1, 1, 4, 4), torch.rand(1, 18, 2, 2),
                             torch.rand(1, 1, 3, 3))
    assert tv.ops.roi_align(x, rois, 2).shape == (1, 2, 2, 2)  # the claimed ones still run
