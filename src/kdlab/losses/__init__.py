"""Pure distillation losses (architecture contract 2).

Every function is a pure function of tensors, documented with its equation and paper, reduced as
a batch mean and computed in (at least) float32 whatever the autocast state. Teacher inputs are
detached inside each loss.
"""

from kdlab.losses.crd import crd_loss
from kdlab.losses.dckd import dckd_loss
from kdlab.losses.deit import deit_loss
from kdlab.losses.dense import cwd_loss, dist_pixel_loss, pixel_kd_loss
from kdlab.losses.dist import dist_loss
from kdlab.losses.feature import (
    at_loss,
    attention_map,
    fitnet_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)
from kdlab.losses.logit import dkd_loss, kd_loss, nkd_loss
from kdlab.losses.mlkd import mlkd_loss
from kdlab.losses.ofa import ofa_loss
from kdlab.losses.reviewkd import hcl_loss
from kdlab.losses.sdd import multiscale_logits, sdd_loss
from kdlab.losses.standardize import standardize_logits
from kdlab.losses.wttm import ttm_loss, wttm_loss

__all__ = [
    "at_loss",
    "attention_map",
    "crd_loss",
    "cwd_loss",
    "dckd_loss",
    "deit_loss",
    "dist_loss",
    "dist_pixel_loss",
    "dkd_loss",
    "fitnet_loss",
    "hcl_loss",
    "kd_loss",
    "mlkd_loss",
    "multiscale_logits",
    "nkd_loss",
    "ofa_loss",
    "pixel_kd_loss",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "sdd_loss",
    "sp_loss",
    "standardize_logits",
    "ttm_loss",
    "wttm_loss",
]
