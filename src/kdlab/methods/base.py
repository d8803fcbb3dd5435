"""Distillation methods ("distillers"): the registered classes that turn model outputs into losses.

Architecture contract 3: a distiller owns its typed hyperparameters (a pydantic ``Params`` model)
and any trainable helper modules (regressors, embeddings, memory banks), and maps
``(student output, teacher output, batch, epoch)`` to a dict of named, already-weighted loss terms.
The total loss is the sum of the dict's values, computed only by :func:`total_loss`. Composite
methods (SD-DKD + CRD, DCKD + FitNet) are compositions of registered distillers
(:mod:`kdlab.methods.compose`), not copies.

There are two kinds:

* ``kind = "logit"``: vanilla, kd, dkd, nkd, sd_kd, sd_dkd, sd_nkd, dckd, mlkd, dist, ttm,
  wttm, deit, ofa. They own the
  cross-entropy term (``ce_weight``) and at most one is used per run.
* ``kind = "partner"``: fitnet, at, rkd, sp, pkt, crd, reviewkd. They return only their own
  term(s), scaled by their ``weight`` (lambda_f); any number may be added to a logit method. Used
  alone, a partner is composed with ``vanilla`` (CE weight 1.0), the published baseline setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from kdlab.core.errors import MethodError
from kdlab.data.batch import Batch
from kdlab.models.output import KdModel, ModelOutput

__all__ = [
    "Batch",
    "DistillContext",
    "Distiller",
    "MethodParams",
    "requested_views",
    "total_loss",
    "warmup_factor",
]


class MethodParams(BaseModel):
    """Base of every method's hyperparameter schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: A distiller's parameter class (``Distiller[KDParams]`` reads ``self.params`` as KDParams).
P = TypeVar("P", bound=MethodParams)


@dataclass
class DistillContext:
    """What a distiller may need to build its helper modules.

    ``student_probe``/``teacher_probe`` are outputs of one dummy batch, so helper modules can be
    sized from real feature shapes. ``train_labels`` are the labels of the whole training set in
    index order (CRD samples its negatives with them). The models themselves are referenced, not
    owned: a distiller must not register them as submodules (the SDD methods call their
    classifiers on pooled regions). ``teacher`` is None only for teacher/baseline training
    (``kdlab train``), where the method is ``vanilla``. Build it with :meth:`from_models`.
    """

    student: KdModel
    teacher: KdModel | None
    student_probe: ModelOutput
    teacher_probe: ModelOutput | None
    num_classes: int
    train_labels: Tensor
    input_size: int = 32

    @classmethod
    def from_models(
        cls,
        student: KdModel,
        teacher: KdModel | None,
        *,
        num_classes: int,
        train_labels: Tensor,
        input_size: int,
    ) -> DistillContext:
        """The context of ``student`` and ``teacher``, probed with one ``input_size`` batch each
        (the student first; no teacher probe without a teacher)."""
        return cls(
            student=student,
            teacher=teacher,
            student_probe=student.probe(input_size),
            teacher_probe=None if teacher is None else teacher.probe(input_size),
            num_classes=num_classes,
            train_labels=train_labels,
            input_size=input_size,
        )

    def require_teacher_probe(self, method: str) -> ModelOutput:
        """The teacher's probe, or :class:`MethodError` naming ``method`` when there is no
        teacher (``build_method`` refuses such contexts first; this guards direct use)."""
        if self.teacher_probe is None:
            raise MethodError(f"method {method!r} needs a teacher")
        return self.teacher_probe


def _params_of_generic_bases(cls: type) -> type[MethodParams] | None:
    """The parameter class bound in the nearest generic ``Distiller`` base of ``cls``.

    Walks the MRO, so ``SDDKD(_SDDBase[SDDKDParams])`` with ``_SDDBase(Distiller[SP],
    Generic[SP])`` gives ``SDDKDParams``; bases still parameterised by a type variable are skipped.
    """
    for klass in cls.__mro__:
        for base in klass.__dict__.get("__orig_bases__", ()):
            origin = get_origin(base)
            if not (isinstance(origin, type) and issubclass(origin, Distiller)):
                continue
            for arg in get_args(base):
                if isinstance(arg, type) and issubclass(arg, MethodParams):
                    return arg
    return None


class Distiller(nn.Module, Generic[P]):
    """Base distiller, generic over its parameter class.

    Subclasses derive from ``Distiller[XParams]``, set ``name`` and ``kind`` and implement
    ``forward``; ``Params`` is inferred from the generic argument (a subclass may still set it).
    ``forward(out_s, out_t, batch, epoch)`` returns ``{term_name: weighted scalar tensor}``;
    ``epoch`` counts from 1 (loss warm-ups use ``min(epoch / warmup_epochs, 1)``). Losses are
    computed in float32 whatever the autocast state.
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["logit", "partner"]]
    Params: ClassVar[type[MethodParams]]
    #: gradient-norm clip the method's published trainer uses (SDD: 40), or None.
    default_clip_grad_norm: ClassVar[float | None] = None
    #: whether ``forward`` reads the teacher's output (the trainer skips the teacher forward
    #: pass when no part of the method does).
    uses_teacher: ClassVar[bool] = True
    #: the input views ``forward`` reads: "weak" is the batch's images; a method that also
    #: lists "strong" (MLKD) gets a strongly augmented view of every image (``Batch.strong``) and
    #: both models' outputs on it in ``out.views["strong"]`` (see :func:`requested_views`).
    views: ClassVar[tuple[str, ...]] = ("weak",)
    #: whether the student must have a DeiT distillation token (``KdModel.distillation_token``)
    needs_distillation_token: ClassVar[bool] = False
    #: whether the method builds helper modules from the student's stage ``features`` (OFA)
    needs_stage_features: ClassVar[bool] = False
    #: whether the method reads segmentation logit maps (``ModelOutput.dense_logits``: CWD, SDD
    #: on maps), so it runs with ``task: segmentation`` only
    needs_dense_maps: ClassVar[bool] = False

    params: P
    ctx: DistillContext

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Params" not in cls.__dict__:
            params_cls = _params_of_generic_bases(cls)
            if params_cls is not None:
                cls.Params = params_cls

    def __init__(self, params: P, ctx: DistillContext) -> None:
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

    def epoch_metrics(self) -> dict[str, float]:
        """Values of the method's own state to record with each epoch (e.g. CTKD's learned
        ``temperature``); read once after the epoch's training. Default: none."""
        return {}


def requested_views(module: nn.Module) -> tuple[str, ...]:
    """The input views the distillers in ``module`` (a distiller or a composite) read: "weak"
    first, then the others sorted. ``("weak",)`` unless a method asks for more (MLKD, CVPR 2023:
    ``("weak", "strong")``); the trainer's loader then yields them."""
    names = {v for m in module.modules() if isinstance(m, Distiller) for v in m.views}
    return ("weak", *sorted(names - {"weak"}))


def total_loss(terms: dict[str, Tensor]) -> Tensor:
    """The total loss: the sum of the named, already-weighted loss terms (architecture contract 3).

    The one place the sum is computed, in float32 (every term is cast first).
    """
    return torch.stack([v.float() for v in terms.values()]).sum()


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """Linear loss warm-up ``min(epoch / warmup_epochs, 1)`` with epochs counted from 1 (DKD,
    CVPR 2022).

    ``warmup_epochs <= 0`` means no warm-up (factor 1).
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)
