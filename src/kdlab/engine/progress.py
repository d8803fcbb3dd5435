"""Progress display for the CLI: a tqdm bar per epoch and one log line per finished epoch."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("kdlab")


class TqdmProgress:
    """The trainer's progress display: epoch, loss, accuracy, img/s and ETA."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start_epoch(self, epoch: int, total_epochs: int, steps: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{total_epochs}", unit="step",
                        leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, steps_done: int, info: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.n = steps_done
        self.bar.set_postfix(loss=f"{info['loss']:.4f}", acc=f"{info['acc']:.1f}",
                             img_s=f"{info['img_s']:.0f}", refresh=False)
        self.bar.refresh()

    def end_epoch(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        test = (f" test top-1 {record['test_top1']:.2f} (best {record['best_top1']:.2f})"
                if "test_top1" in record else "")
        log.info("epoch %d: loss %.4f, train top-1 %.2f, %.0f img/s%s", record["epoch"],
                 record["train_loss"], record["train_top1"], record["train_img_per_s"], test)
