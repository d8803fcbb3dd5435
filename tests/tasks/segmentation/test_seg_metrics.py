"""Confusion matrix and mIoU against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.tasks.segmentation.metrics import confusion_matrix, segmentation_scores


def test_confusion_matrix_counts_labelled_pixels_only() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = confusion_matrix(pred, target, 3)
    # rows = labels, columns = predictions; the 255 pixel is left out
    assert conf.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]


def test_scores_match_a_hand_computed_matrix() -> None:
    conf = torch.tensor([[50, 2, 3, 0],
                         [4, 30, 6, 0],
                         [1, 0, 9, 0],
                         [0, 0, 0, 0]])  # class 3: absent from labels and predictions
    scores, ious = segmentation_scores(conf)
    # IoU_k = tp / (row + col - tp)
    iou0 = 50 / (55 + 55 - 50)
    iou1 = 30 / (40 + 32 - 30)
    iou2 = 9 / (10 + 18 - 9)
    assert ious[0] == pytest.approx(100 * iou0) and ious[1] == pytest.approx(100 * iou1)
    assert ious[2] == pytest.approx(100 * iou2) and ious[3] is None
    assert scores["mIoU"] == pytest.approx(100 * (iou0 + iou1 + iou2) / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 89 / 105)
    assert scores["mAcc"] == pytest.approx(100 * (50 / 55 + 30 / 40 + 9 / 10) / 3)


def test_a_class_only_predicted_counts_with_iou_zero() -> None:
    conf = torch.tensor([[4, 1], [0, 0]])  # class 1 predicted once, never labelled
    scores, ious = segmentation_scores(conf)
    assert ious == [pytest.approx(80.0), 0.0]
    assert scores["mIoU"] == pytest.approx(40.0)
    assert math.isclose(scores["mAcc"], 80.0)
