"""Distillation methods: registered distillers and their composition.

Logit methods: vanilla, kd, dkd, nkd, sd_kd, sd_dkd, sd_nkd, dckd, mlkd, dist, ttm, wttm, deit,
ofa; on segmentation logit maps: cwd, sd_map.
Partners: fitnet, at, rkd, sp, pkt, crd, reviewkd. See :mod:`kdlab.methods.base` for the
contract. Every module of this package is imported on the first registry lookup
(:mod:`kdlab.core.registry`), which registers it.
"""

from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams, warmup_factor
from kdlab.methods.compose import CompositeDistiller, build_method
from kdlab.methods.registry import get_method, list_methods, register_method

__all__ = [
    "Batch",
    "CompositeDistiller",
    "DistillContext",
    "Distiller",
    "MethodParams",
    "build_method",
    "get_method",
    "list_methods",
    "register_method",
    "warmup_factor",
]
