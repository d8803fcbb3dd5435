"""Distillation methods ("distillers"): the registered classes that turn model outputs into losses.

Architecture contract 3: a distiller owns its typed hyperparameters (a pydantic ``Params`` model)
and any trainable helper modules (regressors, embeddings, memory banks), and maps
``(student output, teacher output, batch, epoch)`` to a dict of named, already-weighted loss terms.
The total loss is the sum of the dict's values. Composite methods (SD-DKD + CRD, DCKD + FitNet)
are compositions of registered distillers (:mod:`kdlab.methods.compose`), not copies.

There are two kinds:

* ``kind = "logit"``: vanilla, kd, dkd, nkd, sd_kd, sd_dkd, sd_nkd, dckd. They own the
  cross-entropy term (``ce_weight``) and at most one is used per run.
* ``kind = "partner"``: fitnet, at, rkd, sp, pkt, crd, reviewkd. They return only their own
  term(s), scaled by their ``weight`` (lambda_f); any number may be added to a logit method. Used
  alone, a partner is composed with ``vanilla`` (CE weight 1.0), the published baseline setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from kdlab.models.output import KdModel, ModelOutput


class MethodParams(BaseModel):
    """Base of every method's hyperparameter schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Batch:
    """One training batch as the distillers see it.

    ``index`` holds each sample's position in the training set (CRD's memory bank uses it).
    """

    images: Tensor
    labels: Tensor
    index: Tensor


@dataclass
class DistillContext:
    """What a distiller may need to build its helper modules.

    ``student_probe``/``teacher_probe`` are outputs of one dummy batch, so helper modules can be
    sized from real feature shapes. ``train_labels`` are the labels of the whole training set in
    index order (CRD samples its negatives with them). The models themselves are referenced, not
    owned: a distiller must not register them as submodules (the SDD methods call their
    classifiers on pooled regions). ``teacher`` is None only for teacher/baseline training
    (``kdlab train``), where the method is ``vanilla``.
    """

    student: KdModel
    teacher: KdModel | None
    student_probe: ModelOutput
    teacher_probe: ModelOutput | None
    num_classes: int
    train_labels: Tensor
    input_size: int = 32


class Distiller(nn.Module):
    """Base distiller. Subclasses set ``name``, ``kind``, ``Params`` and implement ``forward``.

    ``forward(out_s, out_t, batch, epoch)`` returns ``{term_name: weighted scalar tensor}``;
    ``epoch`` counts from 1 (loss warm-ups use ``min(epoch / warmup, 1)``). Losses are computed
    in float32 whatever the autocast state.
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["logit", "partner"]]
    Params: ClassVar[type[MethodParams]]
    #: gradient-norm clip the method's published trainer uses (SDD: 40), or None.
    default_clip_grad_norm: ClassVar[float | None] = None
    #: whether ``forward`` reads the teacher's output (the trainer skips the teacher forward
    #: pass when no part of the method does).
    uses_teacher: ClassVar[bool] = True

    def __init__(self, params: MethodParams, ctx: DistillContext) -> None:
        super().__init__()
        self.params = params
        # A plain attribute: the context holds the models, which must not become submodules.
        object.__setattr__(self, "ctx", ctx)

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The method's name and resolved hyperparameters (recorded in the run)."""
        return {"name": self.name, "params": self.params.model_dump()}


def warmup_factor(epoch: int, warmup: int) -> float:
    """Linear loss warm-up ``min(epoch / warmup, 1)`` with epochs counted from 1 (DKD, CVPR 2022).

    ``warmup <= 0`` means no warm-up (factor 1).
    """
    if warmup <= 0:
        return 1.0
    return min(epoch / warmup, 1.0)
