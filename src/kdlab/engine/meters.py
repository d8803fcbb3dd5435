"""Epoch meters: the training record of one epoch, accumulated on the device.

Sums of every loss term (float64), the task's own training metric (e.g.
top-1 accuracy), images seen and time; the host reads them only for the progress display and at
the end of the epoch, where distributed runs reduce them over the ranks.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from kdlab.core.distributed import DistInfo, all_reduce_sum
from kdlab.tasks.base import TrainMeter

__all__ = ["EpochMeter"]


class EpochMeter:
    """Loss terms and the task's training metric over one epoch's applied steps.

    The epoch's ``train_loss`` is the sum of the terms' epoch means (float64), so that it is
    exactly the sum of the ``train_terms`` it is recorded beside."""

    def __init__(self, task_meter: TrainMeter[Any, Any], device: torch.device) -> None:
        self.task_meter = task_meter
        self.device = device
        self.names: list[str] = []
        self.term_sums: Tensor | None = None
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, terms: dict[str, Tensor], values: Tensor, output: Any, batch: Any) -> None:
        """One applied step: its terms (``values`` stacked in ``terms``' order), the student's
        output and the batch."""
        if self.term_sums is None:
            self.names = list(terms)
            self.term_sums = torch.zeros(len(self.names), dtype=torch.float64,
                                         device=self.device)
        self.term_sums += values.detach().double()
        self.task_meter.update(output, batch)
        self.steps += 1

    def elapsed(self) -> float:
        """Seconds since the epoch began (on resume mid-epoch, including the time before)."""
        return time.perf_counter() - self.t0

    def state_dict(self) -> dict[str, Any]:
        """The sums so far (a step checkpoint, so a run resumed mid-epoch records the same)."""
        return {"names": list(self.names),
                "term_sums": None if self.term_sums is None else self.term_sums.cpu(),
                "steps": self.steps,
                "elapsed": self.elapsed(), "task": self.task_meter.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.names = list(state["names"])
        sums = state["term_sums"]
        self.term_sums = None if sums is None else sums.to(self.device)
        self.steps = int(state["steps"])
        self.t0 = time.perf_counter() - float(state["elapsed"])
        self.task_meter.load_state_dict(state["task"])

    def progress(self) -> dict[str, float]:
        """Mean loss so far, the task's figures and images/s (synchronises the host)."""
        total = 0.0 if self.term_sums is None else float(self.term_sums.sum())
        return {"loss": total / max(self.steps, 1),
                **self.task_meter.progress(),
                "img_s": self.task_meter.samples / max(self.elapsed(), 1e-9)}

    def finish(self, dist: DistInfo, skipped: int) -> dict[str, Any]:
        """The epoch's training record; in a distributed run the per-rank sums of batch means
        become means over the ranks and the task's counts global counts."""
        elapsed = self.elapsed()
        sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        if self.term_sums is not None:
            sums = self.term_sums
        if dist.enabled:
            all_reduce_sum(sums, dist).div_(dist.world_size)
        self.task_meter.reduce(dist)
        done = max(self.steps, 1)
        values = sums.tolist()
        return {
            "train_loss": sum(values) / done,
            "train_terms": {n: v / done for n, v in zip(self.names, values, strict=True)},
            **self.task_meter.summary(),
            "train_img_per_s": self.task_meter.samples / max(elapsed, 1e-9),
            "train_time_s": elapsed,
            "skipped_steps": skipped,
        }
