"""Epoch meters: the training record of one epoch, accumulated on the device.

Sums of every loss term and of the total loss (float64), the task's own training metric (e.g.
top-1 accuracy), images seen and time; the host reads them only for the progress display and at
the end of the epoch, where distributed runs reduce them over the ranks.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from kdlab.engine.distributed import DistInfo, all_reduce_sum
from kdlab.tasks.base import TrainMeter

__all__ = ["EpochMeter"]


class EpochMeter:
    """Loss terms, total loss and the task's training metric over one epoch's applied steps."""

    def __init__(self, task_meter: TrainMeter[Any, Any], device: torch.device) -> None:
        self.task_meter = task_meter
        self.device = device
        self.names: list[str] = []
        self.term_sums: Tensor | None = None
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, terms: dict[str, Tensor], values: Tensor, loss: Tensor, output: Any,
            batch: Any) -> None:
        """One applied step: its terms (``values`` stacked in ``terms``' order), total loss,
        the student's output and the batch."""
        if self.term_sums is None:
            self.names = list(terms)
            self.term_sums = torch.zeros(len(self.names), dtype=torch.float64,
                                         device=self.device)
        self.term_sums += values.detach().double()
        self.loss_sum += loss.detach().double()
        self.task_meter.update(output, batch)
        self.steps += 1

    def elapsed(self) -> float:
        """Seconds since the epoch began."""
        return time.perf_counter() - self.t0

    def progress(self) -> dict[str, float]:
        """Mean loss so far, the task's figures and images/s (synchronises the host)."""
        return {"loss": float(self.loss_sum) / max(self.steps, 1),
                **self.task_meter.progress(),
                "img_s": self.task_meter.samples / max(self.elapsed(), 1e-9)}

    def finish(self, dist: DistInfo, skipped: int) -> dict[str, Any]:
        """The epoch's training record; in a distributed run the per-rank sums of batch means
        become means over the ranks and the task's counts global counts."""
        elapsed = self.elapsed()
        sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        if self.term_sums is not None:
            sums = self.term_sums
        totals = torch.cat([sums, self.loss_sum.reshape(1)])
        if dist.enabled:
            all_reduce_sum(totals, dist).div_(dist.world_size)
        self.task_meter.reduce(dist)
        done = max(self.steps, 1)
        values = totals.tolist()
        return {
            "train_loss": values[-1] / done,
            "train_terms": {n: v / done for n, v in zip(self.names, values[:-1], strict=True)},
            **self.task_meter.summary(),
            "train_img_per_s": self.task_meter.samples / max(elapsed, 1e-9),
            "train_time_s": elapsed,
            "skipped_steps": skipped,
        }
