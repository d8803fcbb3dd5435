"""Progress display for the CLI: a tqdm bar per epoch, or (``--no-progress``, for batch jobs
whose output goes to a file) one log line every ``runtime.log_every`` steps; and one log line
per finished epoch either way."""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm import tqdm

from kdlab.tasks.base import Metric, Task

log = logging.getLogger("kdlab")

__all__ = ["EpochLogProgress", "TqdmProgress", "format_figure", "format_figures"]


def format_figure(key: str, value: float) -> str:
    """One progress figure as text, whatever its key: losses with 4 decimals, rates
    (keys ending in ``_s``, per second) as integers, other values of at least 1 with one
    decimal (accuracies in %), smaller ones with 4 significant digits; anything that is not a
    float as it is."""
    if not isinstance(value, float):
        return str(value)
    if "loss" in key:
        return f"{value:.4f}"
    if key.endswith("_s"):
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.4g}"


def format_figures(info: dict[str, Any]) -> str:
    """``loss 1.2345 acc 61.2 img_s 812``: every key of ``info`` in its order."""
    return " ".join(f"{k} {format_figure(k, v)}" for k, v in info.items())


class TqdmProgress:
    """The trainer's progress display.

    Enabled: a tqdm bar per epoch on stderr with the figures the trainer reports (loss, the
    task's figures, img/s) and an ETA. Disabled (``--no-progress``): no bar, but one log line
    per :meth:`update` (the trainer calls it every ``runtime.log_every`` steps and at the last
    step of an epoch), e.g. ``epoch 3/240 step 150/782 loss 1.2345 acc 61.2 img_s 812``.
    Both end each epoch with one log line.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self._epoch = 0
        self._total_epochs = 0
        self._steps = 0

    def start_epoch(self, epoch: int, total_epochs: int, steps: int) -> None:
        self._epoch, self._total_epochs, self._steps = epoch, total_epochs, steps
        if not self.enabled:
            return

        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{total_epochs}", unit="step",
                        leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, steps_done: int, info: dict[str, float]) -> None:
        if not self.enabled:
            log.info("epoch %d/%d step %d/%d %s", self._epoch, self._total_epochs, steps_done,
                     self._steps, format_figures(info))
            return
        if self.bar is None:
            return
        self.bar.n = steps_done
        self.bar.set_postfix({k: format_figure(k, v) for k, v in info.items()}, refresh=False)
        self.bar.refresh()

    def end_epoch(self, record: dict[str, Any], task: Task[Any, Any, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        log.info("epoch %d: loss %.4f, %s%.0f img/s%s", record["epoch"], record["train_loss"],
                 _train_metric(record, task.train_metric), record["train_img_per_s"],
                 _test_metric(record, task.metric(task.best_metric)))


class EpochLogProgress(TqdmProgress):
    """One log line per finished epoch and nothing per step (``kdlab.run``'s default), e.g.
    ``epoch 3: loss 0.4123, train top-1 86.20, 812 img/s test top-1 85.10 (best 85.10)``."""

    def __init__(self) -> None:
        super().__init__(enabled=False)

    def update(self, steps_done: int, info: dict[str, float]) -> None:
        """Per-step figures are not shown."""


def _train_metric(record: dict[str, Any], metric: Metric) -> str:
    """``"train top-1 93.10, "`` (classification) or ``"train RoI acc 88.00, "`` (detection)."""
    key = f"train_{metric.name}"
    return f"train {metric.label} {record[key]:.2f}, " if key in record else ""


def _test_metric(record: dict[str, Any], metric: Metric) -> str:
    """``" test top-1 71.20 (best 71.50)"`` for the task's evaluation metric, if evaluated."""
    key = metric.name
    if f"test_{key}" not in record or f"best_{key}" not in record:
        return ""
    best = record[f"best_{key}"]
    best_text = "n/a" if best is None else f"{best:.2f}"
    return f" test {metric.label} {record[f'test_{key}']:.2f} (best {best_text})"
