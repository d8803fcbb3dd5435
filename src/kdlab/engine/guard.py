"""The non-finite guard: what happens to a step whose loss is NaN or Inf (``runtime.non_finite``).

* ``stop`` (default): no host synchronisation per step. The guard records on the device, for
  every loss term, the first step at which it was not finite; :meth:`check` (every
  ``runtime.log_every`` steps and at the end of the epoch, the only synchronisation) raises
  :class:`~kdlab.core.errors.NonFiniteLossError` naming the epoch, the step and the term(s) that
  broke first, not those poisoned by the NaN weights after it.
* ``skip``: every step is checked on the host before its update; a bad step is skipped and
  counted, and the run stops once more than ``runtime.max_skipped_steps`` were skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kdlab.core.distributed import DistInfo, all_reduce_sum
from kdlab.core.errors import NonFiniteLossError

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """One epoch's non-finite bookkeeping (see module docstring).

    ``kept`` describes, for the error message, what survives (the last good checkpoint).
    """

    def __init__(self, policy: str, max_skipped: int, skipped_before: int, epoch: int,
                 device: torch.device, kept: Callable[[], str]) -> None:
        self.policy = policy
        self.max_skipped = max_skipped
        self.total_skipped = skipped_before
        self.skipped = 0
        self.epoch = epoch
        self.kept = kept
        self._device = device
        self._names: list[str] = []
        self._first_bad: Tensor | None = None
        self._good_steps = torch.zeros((), dtype=torch.long, device=device)
        self._calls = 0

    def skip(self, terms: dict[str, Tensor], values: Tensor) -> bool:
        """Called once per step of the epoch, in order. In ``skip`` mode: whether this step
        (``values``: its terms) must be skipped; raises after too many. Always False in
        ``stop`` mode (which checks later, without a host synchronisation)."""
        self._calls += 1
        step = self._calls
        if self.policy != "skip" or bool(torch.isfinite(values).all()):
            return False
        self.skipped += 1
        self.total_skipped += 1
        if self.total_skipped > self.max_skipped:
            finite = torch.isfinite(values).tolist()
            self._raise(step, [n for n, ok in zip(terms, finite, strict=True) if not ok])
        return True

    def state_dict(self) -> dict[str, Any]:
        """The epoch's bookkeeping so far (saved in step checkpoints)."""
        return {"skipped": self.skipped, "total_skipped": self.total_skipped,
                "calls": self._calls, "names": list(self._names),
                "good_steps": self._good_steps.cpu(),
                "first_bad": None if self._first_bad is None else self._first_bad.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.skipped, self.total_skipped = int(state["skipped"]), int(state["total_skipped"])
        self._calls, self._names = int(state["calls"]), list(state["names"])
        self._good_steps = state["good_steps"].to(self._device)
        bad = state["first_bad"]
        self._first_bad = None if bad is None else bad.to(self._device)

    def observe(self, terms: dict[str, Tensor], values: Tensor) -> None:
        """Record an applied step's terms (no host synchronisation)."""
        if self._first_bad is None:
            self._names = list(terms)
            self._first_bad = torch.full((len(self._names),), -1, dtype=torch.long,
                                         device=self._device)
        self._good_steps += 1
        bad = ~torch.isfinite(values)
        self._first_bad = torch.where((self._first_bad < 0) & bad, self._good_steps,
                                      self._first_bad)

    def check(self, dist: DistInfo) -> None:
        """Raise if any rank saw a non-finite term since the epoch began (synchronises)."""
        if self._first_bad is None:
            return
        first_bad = self._first_bad
        if not bool(all_reduce_sum((first_bad >= 0).any().long(), dist)):
            return
        bad_steps = first_bad[first_bad >= 0]
        if bad_steps.numel() == 0:  # another rank broke; this one names no term of its own
            self._raise(None, [])
        step = int(bad_steps.min())
        self._raise(step, [n for n, s in zip(self._names, first_bad.tolist(), strict=True)
                           if s == step])

    def _raise(self, step: int | None, bad: list[str]) -> None:
        raise NonFiniteLossError(
            f"non-finite loss at epoch {self.epoch}, step {step} in term(s) {', '.join(bad)}; "
            f"{self.kept()}; lower the learning rate or set runtime.non_finite=skip"
        )
