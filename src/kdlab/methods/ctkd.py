"""CTKD's learned global temperature (Li et al., "Curriculum Temperature for Knowledge
Distillation", AAAI 2023), implemented once for every logit method that has a temperature.

A logit method whose parameters set ``learned_temperature`` (the block
:class:`CurriculumTemperatureParams`; ``None``, the default, keeps the fixed ``temperature``)
owns one :class:`CurriculumTemperature` module: a scalar parameter ``theta`` and

    ``T = t_start + t_end * sigmoid(GRL_lambda(theta))``,

where the gradient-reversal layer ``GRL_lambda`` is the identity forward and multiplies the
gradient by ``lambda`` backward. ``lambda`` follows the cosine curriculum of the epoch ``e``
(counted from 1)::

    lambda(e) = lambda_min + (lambda_max - lambda_min) * (1 + cos(pi * min(e, E) / E)) / 2

with ``E = lambda_epochs``: ``lambda_max`` (0) before the first epoch, ``lambda_min`` (-1) from
epoch ``E`` (10) on. A negative ``lambda`` makes the optimizer step ``theta`` UP the distillation
loss (the temperature maximises it, the student minimises it). ``theta`` is trained by the
student's optimizer (same learning rate, momentum and weight decay) and saved in the checkpoint
with the distiller. See ``docs/methods/ctkd.md``.

Official code (zhengli97/CTKD): ``models/temp_global.py`` (``Global_T``: ``theta`` initialised to
1, the GRL multiplies the incoming gradient by ``lambda``), ``helper/loops.py`` L132-137
(``T = t_start + t_end * sigmoid(theta)``), ``train_student.py`` (``CosineDecay``, evaluated once
per epoch with the epoch counted from 1; ``theta`` is in the SGD optimizer with the student;
``scripts/run_cifar_distill.sh``: ``--decay_max 0 --decay_min -1 --decay_loops 10``).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from pydantic import Field
from torch import Tensor, nn

from kdlab.methods.base import MethodParams

__all__ = [
    "CurriculumTemperature",
    "CurriculumTemperatureParams",
    "LearnedTemperatureParams",
    "curriculum_lambda",
    "gradient_reversal",
]


class CurriculumTemperatureParams(MethodParams):
    """CTKD's global temperature and its curriculum; defaults are the official CIFAR script's.

    ``lambda_max``/``lambda_min`` follow the official code's sign convention: the GRL multiplies
    the temperature's gradient by ``lambda`` (the paper writes ``lambda`` from 0 to 1 and a GRL
    that multiplies by ``-lambda``: the same update).
    """

    t_start: float = Field(1.0, gt=0, description="lowest temperature: T = t_start + "
                           "t_end * sigmoid(theta)")
    t_end: float = Field(20.0, gt=0, description="range of the temperature "
                         "(T < t_start + t_end)")
    init: float = Field(1.0, description="initial theta (official 1: T = 1 + 20 sigmoid(1) = "
                        "15.62)")
    lambda_max: float = Field(0.0, description="GRL gradient multiplier before the first "
                              "epoch (official 0)")
    lambda_min: float = Field(-1.0, description="GRL gradient multiplier from epoch "
                              "lambda_epochs on (official -1: the temperature ascends the loss)")
    lambda_epochs: int = Field(10, ge=1, description="epochs of the cosine curriculum from "
                               "lambda_max to lambda_min (official 10)")


class LearnedTemperatureParams(MethodParams):
    """Mixin of the logit methods' parameters: the optional CTKD temperature block."""

    learned_temperature: CurriculumTemperatureParams | None = Field(
        None,
        description="CTKD's learned global temperature (Li et al., AAAI 2023); None: the fixed "
        "temperature",
    )


def curriculum_lambda(epoch: int, lambda_max: float, lambda_min: float, epochs: int) -> float:
    """CTKD's cosine curriculum of the GRL multiplier at ``epoch`` (counted from 1).

    ``lambda = (cos(pi * i / E) + 1) / 2 * (lambda_max - lambda_min) + lambda_min`` with
    ``i = clamp(epoch, 0, E)`` and ``E = epochs``, computed in the order of the official
    ``CosineDecay.get_value`` (zhengli97/CTKD, ``train_student.py``), so the values are equal.
    """
    i = min(max(epoch, 0), epochs)
    value = (math.cos(i * math.pi / epochs) + 1.0) * 0.5
    return value * (lambda_max - lambda_min) + lambda_min


class _GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``lam`` backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * grad.new_tensor(ctx.lam), None


def gradient_reversal(x: Tensor, lam: float) -> Tensor:
    """``x`` forward; ``lam * dL/dx`` backward (CTKD's GRL, ``models/temp_global.py``).

    With ``lam < 0`` a gradient-descent step on ``x`` ascends the loss.
    """
    return cast(Tensor, _GradientReversal.apply(x, lam))


class CurriculumTemperature(nn.Module):
    """CTKD's learned global temperature (Li et al., AAAI 2023).

    ``forward(epoch)`` returns the 0-dim temperature ``T = t_start + t_end * sigmoid(theta)``
    with ``theta`` behind the gradient-reversal layer of the epoch's curriculum ``lambda``
    (:func:`curriculum_lambda`), so the loss's gradient reaches ``theta`` multiplied by
    ``lambda``. ``theta`` is a 0-dim float32 parameter initialised to ``init``.
    """

    def __init__(self, params: CurriculumTemperatureParams) -> None:
        super().__init__()
        self.params = params
        self.theta = nn.Parameter(torch.tensor(float(params.init), dtype=torch.float32))
        #: the multiplier of the latest forward (for :meth:`epoch_metrics`), None before one.
        self.last_lambda: float | None = None

    def grl_lambda(self, epoch: int) -> float:
        """The curriculum's GRL multiplier at ``epoch`` (counted from 1)."""
        p = self.params
        return curriculum_lambda(epoch, p.lambda_max, p.lambda_min, p.lambda_epochs)

    def value(self, theta: Tensor) -> Tensor:
        """``t_start + t_end * sigmoid(theta)`` in float32 (at least)."""
        p = self.params
        theta = theta.to(torch.promote_types(theta.dtype, torch.float32))
        return p.t_start + p.t_end * torch.sigmoid(theta)

    def forward(self, epoch: int) -> Tensor:
        """The 0-dim temperature of a step of ``epoch``, differentiable in ``theta`` (through the
        GRL)."""
        lam = self.grl_lambda(epoch)
        self.last_lambda = lam
        return self.value(gradient_reversal(self.theta, lam))

    def current(self) -> float:
        """The temperature of the current ``theta`` (a host sync; for logging)."""
        with torch.no_grad():
            return float(self.value(self.theta.detach()))

    def epoch_metrics(self) -> dict[str, float]:
        """``{"temperature": T of the current theta, "ctkd_lambda": the latest lambda}``."""
        out = {"temperature": self.current()}
        if self.last_lambda is not None:
            out["ctkd_lambda"] = self.last_lambda
        return out
