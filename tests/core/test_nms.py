"""kdlab.core.vision_ops.nms / batched_nms against an independent re-derivation of torchvision's
compiled CPU kernel (sort by score, greedy keep, suppress when IoU > threshold, no +1 in areas)."""

from __future__ import annotations

import pytest
import torch

from kdlab.core.vision_ops import DetectionOpError, batched_nms, nms


def reference_nms(boxes: list[list[float]], scores: list[float], thr: float) -> list[int]:
    """Plain-Python greedy NMS in float64, one pair at a time."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    removed = [False] * len(order)
    keep = []
    for a, i in enumerate(order):
        if removed[a]:
            continue
        keep.append(i)
        x1, y1, x2, y2 = boxes[i]
        for b in range(a + 1, len(order)):
            j = order[b]
            u1, v1, u2, v2 = boxes[j]
            iw, ih = max(0.0, min(x2, u2) - max(x1, u1)), max(0.0, min(y2, v2) - max(y1, v1))
            inter = iw * ih
            union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
            if union > 0 and inter / union > thr:
                removed[b] = True
    return keep


def random_boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40 + 1
    scores = torch.randperm(n, generator=g).double() / n  # distinct scores
    return torch.cat([xy, xy + wh], dim=1), scores


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_equals_reference(seed: int, thr: float) -> None:
    boxes, scores = random_boxes(120, seed)
    got = nms(boxes, scores, thr).tolist()
    assert got == reference_nms(boxes.tolist(), scores.tolist(), thr)
    assert got == nms(boxes.float(), scores.float(), thr).tolist()


def test_iou_equal_to_threshold_is_kept_and_order_is_by_score() -> None:
    # IoU([0,0,2,1], [0,0,1,1]) = 1 / 2 exactly
    boxes = torch.tensor([[0.0, 0, 1, 1], [0.0, 0, 2, 1], [10.0, 10, 11, 11]])
    scores = torch.tensor([0.5, 0.9, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2, 0]
    assert nms(boxes, scores, 0.49).tolist() == [1, 2]


def test_empty_and_bad_shapes() -> None:
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                       0.5).tolist() == []
    with pytest.raises(DetectionOpError, match="N x 4"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(DetectionOpError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_is_per_category(seed: int) -> None:
    boxes, scores = random_boxes(90, seed)
    idxs = torch.randint(0, 4, (90,), generator=torch.Generator().manual_seed(seed))
    expected = []
    for c in range(4):
        members = [i for i in range(90) if int(idxs[i]) == c]
        kept = reference_nms([boxes[i].tolist() for i in members],
                             [float(scores[i]) for i in members], 0.5)
        expected += [members[k] for k in kept]
    expected.sort(key=lambda i: -float(scores[i]))
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == expected


def test_identical_boxes_of_different_categories_both_survive() -> None:
    boxes = torch.tensor([[0.0, 0, 5, 5], [0.0, 0, 5, 5]])
    scores = torch.tensor([0.9, 0.8])
    assert batched_nms(boxes, scores, torch.tensor([0, 1]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([1, 1]), 0.5).tolist() == [0]
