"""DOT: the distillation-oriented trainer as a torch optimizer.

Zhao, Cui, Song, Liang, "DOT: A Distillation-Oriented Trainer", ICCV 2023 (arXiv:2307.08436).
Official code: megvii-research/mdistiller, ``mdistiller/engine/dot.py``
(``DistillationOrientedTrainer``) driven by ``class DOT`` in ``mdistiller/engine/trainer.py``.

SGD with two momentum buffers per parameter: one for the gradient of the task loss (``g_task``,
the cross-entropy) with momentum ``mu - delta`` and one for the gradient of the distillation loss
(``g_kd``) with momentum ``mu + delta``; the parameter moves by both buffers:

    v_task <- (mu - delta) v_task + g_task + wd * theta
    v_kd   <- (mu + delta) v_kd   + g_kd
    theta  <- theta - lr * v_task - lr * v_kd

This module follows the official update operation by operation, including how it treats a
parameter that receives only one of the two gradients (a classifier reached only by the task
loss, a distillation helper such as CRD's embedding heads reached only by the distillation
loss):

* all task-gradient parameters are updated first (``v_task``), then all distillation-gradient
  parameters (``v_kd``), each with ``theta <- theta - lr * v``;
* weight decay is added to the task gradient; a parameter with only a distillation gradient
  gets it added to that gradient instead, except on its first step (the official code creates the
  buffer from the bare gradient before the weight-decay line is reached);
* a parameter with only one of the gradients uses the averaged momentum ``((mu - delta) +
  (mu + delta)) / 2`` for its buffer;
* the first step of a buffer is ``v = g`` (no momentum), as in ``torch.optim.SGD``;
* with ``mu - delta = 0`` the task gradient is applied without a buffer (the official
  ``if momentum != 0`` branch), while the distillation buffer is always kept.

The distillation gradients of a step are handed over with :meth:`~DistillationOrientedSGD.
stash_kd_grads` after the distillation loss's backward pass (they are moved out of ``.grad``);
``.grad`` then receives the task gradient and :meth:`~DistillationOrientedSGD.step` applies both.
Both buffers live in ``self.state`` (``momentum_buffer``, ``momentum_kd_buffer``), so
``state_dict()`` round-trips them; the stash holds gradients only between a step's backward pass
and its update. Without Nesterov momentum and without dampening, as the official optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["DistillationOrientedSGD"]


class DistillationOrientedSGD(torch.optim.Optimizer):
    """SGD with separate momentum for the task and the distillation gradient (DOT, ICCV 2023).

    Param-group keys: ``lr``, ``momentum`` (the task momentum ``mu - delta``, the official
    name), ``momentum_kd`` (``mu + delta``) and ``weight_decay``. State per parameter:
    ``momentum_buffer`` (task) and ``momentum_kd_buffer`` (distillation). See the module
    docstring for the update; :mod:`kdlab.engine.optimizers` (``optim.name: dot``) drives it.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float,
                 momentum: float, momentum_kd: float, weight_decay: float = 0.0) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if momentum < 0.0 or momentum_kd < 0.0:
            raise ValueError(f"invalid momentum: task {momentum}, distillation {momentum_kd}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay value: {weight_decay}")
        defaults = {"lr": lr, "momentum": momentum, "momentum_kd": momentum_kd,
                    "weight_decay": weight_decay}
        super().__init__(params, defaults)
        #: id(param) -> (param, distillation gradient) of the step under way
        self._kd_grads: dict[int, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ the two gradients
    def stash_kd_grads(self) -> None:
        """Take the distillation gradients out of ``.grad`` (after the distillation loss's
        backward pass): kept for :meth:`step`, and ``.grad`` is None again for the task loss."""
        self._kd_grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._kd_grads[id(p)] = (p, p.grad)
                    p.grad = None

    def clear_kd_grads(self) -> None:
        """Forget a stashed distillation gradient (a step that is not applied)."""
        self._kd_grads = {}

    def kd_grads(self) -> list[Tensor]:
        """The stashed distillation gradients of the step under way (for clipping/unscaling)."""
        return [g for _, g in self._kd_grads.values()]

    def kd_grad(self, p: Tensor) -> Tensor | None:
        """The stashed distillation gradient of ``p``, or None."""
        entry = self._kd_grads.get(id(p))
        return None if entry is None else entry[1]

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One DOT update from ``.grad`` (task) and the stashed distillation gradients.

        The official per-parameter loops, evaluated with ``torch._foreach_*`` over the
        parameters of each kind (the same arithmetic per element, far fewer kernel launches).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kd, self._kd_grads = self._kd_grads, {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            kd_params = [p for p in group["params"] if id(p) in kd]
            self._task_update(group, params, kd)
            self._kd_update(group, kd_params, [kd[id(p)][1] for p in kd_params],
                            {id(p) for p in params})
        return loss

    def _task_update(self, group: dict[str, Any], params: list[Tensor],
                     kd: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Loop 1 of the official ``dot``: weight decay on the task gradient, the task buffer
        (momentum ``mu - delta`` where there is also a distillation gradient, the average
        elsewhere), ``theta -= lr * v_task``."""
        if not params:
            return
        lr, wd, m_task = group["lr"], group["weight_decay"], group["momentum"]
        m_avg = (group["momentum_kd"] + m_task) / 2.0
        grads = [p.grad for p in params]
        d_p = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
        if m_task == 0:  # the official `if momentum != 0` branch: no task buffer at all
            torch._foreach_add_(params, d_p, alpha=-lr)
            return
        steps: list[Tensor] = []
        both: tuple[list[Tensor], list[Tensor]] = ([], [])  # (buffers, increments)
        only: tuple[list[Tensor], list[Tensor]] = ([], [])
        for p, d in zip(params, d_p, strict=True):
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.clone(d).detach()
                state["momentum_buffer"] = buf
            else:
                bufs, ds = both if id(p) in kd else only
                bufs.append(buf)
                ds.append(d)
            steps.append(buf)
        self._momentum(both, m_task)
        self._momentum(only, m_avg)
        torch._foreach_add_(params, steps, alpha=-lr)

    def _kd_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                   task_ids: set[int]) -> None:
        """Loop 2 of the official ``dot``: the distillation buffer (momentum ``mu + delta``
        where there was a task gradient; the average, and weight decay, elsewhere, except on the
        buffer's first step), ``theta -= lr * v_kd``."""
        if not params:
            return
        lr, wd, m_kd = group["lr"], group["weight_decay"], group["momentum_kd"]
        m_avg = (m_kd + group["momentum"]) / 2.0
        steps: list[Tensor] = []
        both: tuple[list[Tensor], list[Tensor]] = ([], [])  # (buffers, increments)
        only: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])  # + params
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            buf = state.get("momentum_kd_buffer")
            if buf is None:
                buf = torch.clone(g).detach()
                state["momentum_kd_buffer"] = buf
            elif id(p) in task_ids:
                both[0].append(buf)
                both[1].append(g)
            else:
                only[0].append(buf)
                only[1].append(g)
                only[2].append(p)
            steps.append(buf)
        self._momentum(both, m_kd)
        if only[0]:
            d_only = torch._foreach_add(only[1], only[2], alpha=wd) if wd != 0 else only[1]
            self._momentum((only[0], list(d_only)), m_avg)
        torch._foreach_add_(params, steps, alpha=-lr)

    @staticmethod
    def _momentum(pairs: tuple[list[Tensor], list[Tensor]], m: float) -> None:
        """``buf = m * buf + d`` for the buffers and increments of ``pairs``."""
        bufs, ds = pairs
        if bufs:
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, ds)
