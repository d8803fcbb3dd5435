"""DIST logit distiller (Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger
Teacher", NeurIPS 2022).

``L = ce_weight * CE + kd_weight * L_DIST`` with :func:`kdlab.losses.dist.dist_loss`. Defaults
are the official CIFAR-100 strategy (hunto/image_classification_sota
``configs/strategies/distill/dist_cifar.yaml``: ``kd: dist_t4``, ``ori_loss_weight 1``,
``kd_loss_weight 2``; ``dist_t4`` is ``DIST(beta=1, gamma=1, tau=4)`` in
``lib/models/losses/kd_loss.py``). No loss warm-up.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdlab.losses.dist import dist_loss
from kdlab.methods.base import Batch, Distiller, MethodParams
from kdlab.methods.logit import ce_term
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = ["DIST", "DISTParams"]


class DISTParams(MethodParams):
    """DIST (NeurIPS 2022). CIFAR-100 defaults (``dist_cifar.yaml``): CE 1, DIST 2, tau 4,
    beta = gamma = 1."""

    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term "
                             "(official ori_loss_weight)")
    kd_weight: float = Field(2.0, ge=0, description="weight of the DIST term (official "
                             "kd_loss_weight)")
    beta: float = Field(1.0, ge=0, description="weight of the inter-class relation")
    gamma: float = Field(1.0, ge=0, description="weight of the intra-class relation")
    temperature: float = Field(4.0, gt=0, description="softmax temperature tau")
    eps: float = Field(1e-8, ge=0, description="added to the product of the norms in the "
                       "Pearson correlation (the official code's 1e-8; 0: the textbook formula)")


@register_method
class DIST(Distiller[DISTParams]):
    """DIST: ``L = ce_weight * CE + kd_weight * tau^2 (beta * inter + gamma * intra)``.

    Inter-/intra-class Pearson relations of ``softmax(z / tau)`` (see
    :func:`kdlab.losses.dist.dist_loss`). Huang et al., NeurIPS 2022.
    """

    name = "dist"
    kind = "logit"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ce_weight * CE, "dist": kd_weight * L_DIST}`` (no warm-up)."""
        p = self.params
        loss = dist_loss(out_s.logits, out_t.logits, p.beta, p.gamma, p.temperature,
                         eps=p.eps)
        return {"ce": ce_term(out_s, batch, p.ce_weight), "dist": p.kd_weight * loss}
