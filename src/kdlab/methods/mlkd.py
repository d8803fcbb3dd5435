"""MLKD, multi-level logit distillation (Jin, Wang, Lin, CVPR 2023): the ``mlkd`` logit method.

It reads two views of every training image (``views = ("weak", "strong")``): the trainer's
loader adds a strongly augmented view (RandAugment, :mod:`kdlab.data.randaugment`) and the task
runs the student and the teacher on it as well, so a step costs two forward passes of each model.
The loss is :func:`kdlab.losses.mlkd.mlkd_loss`; see ``docs/methods/mlkd.md``.

Under torchrun the masks (batch medians) and the class- and batch-level terms need the whole
global batch: every rank gathers both models' logits of both views and the labels
(:func:`kdlab.core.distributed.gather_batch`, differentiable for the student) and computes the
loss of the global batch, so each rank's loss equals the one-process loss on the concatenated
batch and, with DDP's average of the gradients, so does the update (docs/distributed.md).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, model_validator
from torch import Tensor

from kdlab.core.distributed import gather_batch, group_world_size
from kdlab.losses.mlkd import DEFAULT_TEMPERATURES, mlkd_loss
from kdlab.methods.base import Batch, Distiller, MethodParams
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = ["MLKD", "MLKDParams", "global_views"]

log = logging.getLogger(__name__)


class MLKDParams(MethodParams):
    """MLKD's hyperparameters. Defaults: the official CIFAR-100 values (``cfg.KD``: T 4, CE 0.1,
    KD 0.9; temperatures 4, 3, 5, 2, 6), with the paper's per-sample masking.

    With logit standardization the LS repository runs MLKD with ``temperatures: [2, 3, 5, 2, 6]``
    and ``kd_weight: 9`` (``--base-temp 2 --kd-weight 9``); those are config values, not implied by
    the switch.
    """

    ce_weight: float = Field(
        0.1, ge=0, description="weight of the cross-entropy term (summed over both views)")
    kd_weight: float = Field(
        0.9, ge=0, description="weight of every distillation term (instance, class, batch level)")
    temperatures: list[PositiveFloat] = Field(
        default_factory=lambda: list(DEFAULT_TEMPERATURES),
        min_length=1,
        description="the temperature set of the prediction augmentation (official: the base T 4, "
        "then 3, 5, 2, 6)",
    )
    code_exact: bool = Field(
        False,
        description="the official code's operations and quirks (masks as a kept-fraction "
        "factor, weak logits in the strong KD sum at the 4th/5th temperature, no strong-view "
        "class/batch terms); false: per-sample masking, strong view at every level",
    )
    logit_standardization: bool = Field(
        False,
        description="z-score the student's and the teacher's logits before the instance-level "
        "KD terms (LS, CVPR 2024, as the LS repository's MLKD); CE, masks and the class/batch "
        "terms keep the raw logits",
    )

    @model_validator(mode="after")
    def _five_for_code_exact(self) -> MLKDParams:
        if self.code_exact and len(self.temperatures) != len(DEFAULT_TEMPERATURES):
            raise ValueError(
                f"code_exact needs the official 5 temperatures (e.g. [4, 3, 5, 2, 6]), got "
                f"{len(self.temperatures)}")
        return self


@register_method
class MLKD(Distiller[MLKDParams]):
    """MLKD: ``L = ce_weight (CE(z_s, y) + CE(z_s', y)) + kd_weight (L_ins + L_class +
    L_batch)`` over a weak (``z``) and a strong (``z'``) view.

    Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023; the terms are
    :func:`kdlab.losses.mlkd.mlkd_loss`. Returns ``{"ce", "kd", "cc", "bc"}`` like the official
    ``losses_dict`` (``kd`` = weak + strong instance-level terms).
    """

    name = "mlkd"
    kind = "logit"
    views = ("weak", "strong")

    _warned_single_view = False

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ..., "kd": ..., "cc": ..., "bc": ...}``, every term weighted.

        The strong view's outputs are ``out_s.views["strong"]`` and ``out_t.views["strong"]``.
        Called without them (a direct call on single-view outputs, as the generic method tests
        and ``kdlab bench``'s loss check do; training always provides them) the weak view stands
        in for the strong one, with a warning. Under torchrun every term is that of the global
        batch (:func:`global_views`), the same value on every rank.
        """
        p = self.params
        strong_s, strong_t = out_s.views.get("strong"), out_t.views.get("strong")
        if strong_s is None or strong_t is None:
            if not self._warned_single_view:
                log.warning("mlkd got no strong view: the weak view stands in for it (the "
                            "trainer's loader provides it; this happens only in direct calls)")
                self._warned_single_view = True
            strong_s, strong_t = out_s, out_t
        zs, zt, zs2, zt2, labels = global_views(out_s.logits, out_t.logits, strong_s.logits,
                                                strong_t.logits, batch.labels)
        terms = mlkd_loss(zs, zt, zs2, zt2, p.temperatures, code_exact=p.code_exact,
                          logit_standardization=p.logit_standardization)
        ce = F.cross_entropy(zs.float(), labels) + F.cross_entropy(zs2.float(), labels)
        return {"ce": p.ce_weight * ce, **{k: p.kd_weight * v for k, v in terms.items()}}


def global_views(zs: Tensor, zt: Tensor, zs2: Tensor, zt2: Tensor, labels: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The global batch of MLKD's inputs: ``(z_s, z_t, z_s', z_t', y)`` of every rank,
    concatenated in rank order (the inputs themselves in one process).

    Three collectives: the student's two views in one differentiable gather (its backward sums
    the ranks' gradients, :func:`kdlab.core.distributed.gather_batch`), the teacher's two views
    (detached) in one plain gather, the labels in another. With every rank computing the loss of
    the global batch, DDP's gradient average gives the one-process gradient of Jin, Wang, Lin
    (CVPR 2023)'s loss on the concatenated batch.
    """
    if group_world_size() == 1:
        return zs, zt, zs2, zt2, labels
    c = zs.shape[1]
    s = gather_batch(torch.cat([zs, zs2], dim=1), differentiable=True)
    t = gather_batch(torch.cat([zt, zt2], dim=1).detach())
    return s[:, :c], t[:, :c], s[:, c:], t[:, c:], gather_batch(labels)
