"""DeiT: distillation through a distillation token (method ``deit``).

Touvron, Cord, Douze, Massa, Sablayrolles, Jégou, "Training data-efficient image transformers &
distillation through attention", ICML 2021 (arXiv:2012.12877). Official code:
facebookresearch/deit, ``losses.py`` (``DistillationLoss``) and ``main.py`` (its defaults).

The student has two heads (:attr:`kdlab.models.output.KdModel.distillation_token`; kdlab's
``vit_tiny_distilled`` / ``vit_lite_7_distilled`` and timm's ``deit_*_distilled_*``). In training
its class-token head gives ``logits`` and its distillation-token head ``dist_logits``:

    L = (1 - alpha) * CE_ls(logits, y) + alpha * deit_loss(dist_logits, z_t, type, tau)

``CE_ls`` is the cross-entropy with label smoothing ``label_smoothing`` (DeiT's recipe: 0.1,
``--smoothing``; its mixup/cutmix soft-target variant is not part of kdlab). At inference the
student's logits are the mean of the two heads (done by the model in eval mode).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdlab.core.errors import MethodError
from kdlab.losses.deit import deit_loss
from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = ["DeiT", "DeiTParams"]


class DeiTParams(MethodParams):
    """DeiT's distillation settings; defaults are the official ``main.py`` ones except ``type``.

    The official ``--distillation-type`` defaults to ``none`` (no distillation); ``hard`` is the
    paper's recommended setting and the README's distilled-model recipe, so it is kdlab's default.
    """

    type: Literal["hard", "soft"] = Field(
        "hard", description="distillation term: 'hard' (CE with the teacher's argmax) or 'soft' "
        "(tau^2 KL / numel), official --distillation-type")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term; the "
                         "CE term gets 1 - alpha (official --distillation-alpha)")
    tau: float = Field(1.0, gt=0, description="softmax temperature of 'soft' (official "
                       "--distillation-tau; unused by 'hard')")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the CE "
                                   "term (DeiT's recipe: 0.1, --smoothing)")


@register_method
class DeiT(Distiller[DeiTParams]):
    """``L = (1 - alpha) * CE_ls(z_cls, y) + alpha * deit_loss(z_dist, z_t, type, tau)``.

    Touvron et al., ICML 2021; equal to the official ``DistillationLoss`` with a
    label-smoothing base criterion. Needs a student with a distillation token.
    """

    name = "deit"
    kind = "logit"
    needs_distillation_token = True

    def __init__(self, params: DeiTParams, ctx: DistillContext) -> None:
        if not ctx.student.distillation_token:
            raise MethodError(
                "method 'deit' needs a student with a distillation token: use "
                "student.arch vit_tiny_distilled, vit_lite_7_distilled or a timm "
                "deit_*_distilled_* model")
        super().__init__(params, ctx)

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": (1 - alpha) * CE_ls, "deit": alpha * L_dist}``."""
        p = self.params
        if out_s.dist_logits is None:
            raise MethodError("method 'deit' got no distillation-token logits: the student must "
                              "be in training mode and have a distillation token")
        ce = F.cross_entropy(out_s.logits.float(), batch.labels,
                             label_smoothing=p.label_smoothing)
        dist = deit_loss(out_s.dist_logits, out_t.logits, p.type, p.tau)
        return {"ce": (1.0 - p.alpha) * ce, "deit": p.alpha * dist}
