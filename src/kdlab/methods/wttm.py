"""TTM and WTTM logit distillers (Zheng & Yang, "Knowledge Distillation Based on Transformed
Teacher Matching", ICLR 2024).

The official training script (zkxufo/TTM ``train_student.py`` / ``helper/loops.py``) forms
``loss = r * CE + a * L_add + b * L_distill``: ``-r`` (default 1) weighs the cross-entropy,
``-b`` the ``--distill`` loss and ``-a`` the ``--add`` loss. WTTM alone is ``--distill wttm -b
kd_weight -a 0``; WTTM + CRD is ``--distill crd --add wttm -b <CRD weight> -a <WTTM weight>``,
which in kdlab is the logit method ``wttm`` (weight ``kd_weight``) with the partner ``crd``
(weight ``weight``): ``method: {name: wttm, partners: [{name: crd}]}``. ``--ttm_l`` is
``gamma``. There is no loss warm-up and no temperature on the student.

Defaults: the README's examples, the only hyperparameters the repository gives (the paper's
per-pair values are in its appendix A.4): TTM ``--ttm_l 0.1 -r 1 -b 45`` (VGG13 -> VGG8), WTTM
``--ttm_l 0.2`` with weight 4 (the README's WTTM + CRD command, ``-a 4``).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdlab.losses.wttm import ttm_loss, wttm_loss
from kdlab.methods.base import Batch, Distiller, MethodParams
from kdlab.methods.logit import ce_term
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = ["TTM", "TTMParams", "WTTM", "WTTMParams"]


class TTMParams(MethodParams):
    """TTM (ICLR 2024). Defaults: the README's VGG13 -> VGG8 command (``--ttm_l 0.1 -r 1 -b 45``).
    """

    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term (-r)")
    kd_weight: float = Field(45.0, ge=0, description="weight of the TTM term (-b)")
    gamma: float = Field(0.1, gt=0, description="power-transform exponent of the teacher "
                         "(--ttm_l; temperature 1/gamma on the teacher only)")


class WTTMParams(MethodParams):
    """WTTM (ICLR 2024). Defaults: the README's WTTM example (``--ttm_l 0.2``, weight 4)."""

    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term (-r)")
    kd_weight: float = Field(4.0, ge=0, description="weight of the WTTM term (-b with "
                             "--distill wttm, -a with --add wttm)")
    gamma: float = Field(0.2, gt=0, description="power-transform exponent of the teacher "
                         "(--ttm_l; temperature 1/gamma on the teacher only)")


@register_method
class TTM(Distiller[TTMParams]):
    """TTM: ``L = ce_weight * CE + kd_weight * mean_b KL(p~_t || softmax(z_s))``,
    ``p~_t = softmax(z_t)^gamma / sum softmax(z_t)^gamma``. Zheng & Yang, ICLR 2024."""

    name = "ttm"
    kind = "logit"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ce_weight * CE, "ttm": kd_weight * L_TTM}``."""
        p = self.params
        return {"ce": ce_term(out_s, batch, p.ce_weight),
                "ttm": p.kd_weight * ttm_loss(out_s.logits, out_t.logits, p.gamma)}


@register_method
class WTTM(Distiller[WTTMParams]):
    """WTTM: ``L = ce_weight * CE + kd_weight * mean_b [(sum_c p_t^gamma) KL(p~_t || p_s)]``.

    Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024.
    Composes with partners (``partners: [{name: crd}]`` is the paper's WTTM + CRD).
    """

    name = "wttm"
    kind = "logit"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ce_weight * CE, "wttm": kd_weight * L_WTTM}``."""
        p = self.params
        return {"ce": ce_term(out_s, batch, p.ce_weight),
                "wttm": p.kd_weight * wttm_loss(out_s.logits, out_t.logits, p.gamma)}
