"""Composite methods: one logit method plus any feature/relation partners.

``L = L_logit(CE + output distillation) + sum_j lambda_j * L_partner_j`` (the DCKD paper's
merge of output-based with feature- or relation-based distillation, Wang et al., PLOS ONE 2025;
equally SDD + CRD etc.). Each part is a registered distiller; this module only collects their
terms.
"""

from __future__ import annotations

from typing import Any, cast

from pydantic import ValidationError
from torch import Tensor, nn

from kdlab.config import MethodConfig, format_validation_error
from kdlab.core.errors import ConfigError, MethodError
from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams
from kdlab.methods.registry import get_method, list_methods
from kdlab.models.output import ModelOutput

__all__ = ["CompositeDistiller", "build_method", "build_params", "method_display_name"]


class CompositeDistiller(nn.Module):
    """A logit distiller and zero or more partner distillers whose loss terms are summed.

    A plain module holding its parts (not itself a registered distiller): ``logit`` (the one
    logit method, which owns cross-entropy) and ``partners``. Term names are the parts' own names;
    a partner term whose name is already taken is prefixed with the partner's method name. The
    total loss is :func:`kdlab.methods.base.total_loss` of the terms.

    Attributes:
        uses_teacher: whether any part reads the teacher's output.
        default_clip_grad_norm: the logit method's published gradient-norm clip, or None.
    """

    logit: Distiller[Any]
    partners: nn.ModuleList

    def __init__(self, logit: Distiller[Any], partners: list[Distiller[Any]]) -> None:
        super().__init__()
        self.logit = logit
        self.partners = nn.ModuleList(partners)
        self.uses_teacher: bool = logit.uses_teacher or any(p.uses_teacher for p in partners)
        self.default_clip_grad_norm: float | None = logit.default_clip_grad_norm

    def _partner_list(self) -> list[Distiller[Any]]:
        """The partners, typed (``nn.ModuleList`` iterates as plain modules)."""
        return [cast("Distiller[Any]", p) for p in self.partners]

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{term_name: weighted scalar tensor}`` of every part, logit method first."""
        terms = dict(self.logit(out_s, out_t, batch, epoch))
        for partner in self._partner_list():
            for key, value in partner(out_s, out_t, batch, epoch).items():
                terms[key if key not in terms else f"{partner.name}.{key}"] = value
        return terms

    def describe(self) -> dict[str, Any]:
        """The composite's name (``logit+partner+...``) and each part's description."""
        partners = self._partner_list()
        return {
            "name": "+".join([self.logit.name, *(p.name for p in partners)]),
            "logit": self.logit.describe(),
            "partners": [p.describe() for p in partners],
        }

    def epoch_metrics(self) -> dict[str, float]:
        """Every part's :meth:`~kdlab.methods.base.Distiller.epoch_metrics`, logit method first;
        a partner key already taken is prefixed with the partner's name (as for terms)."""
        metrics = dict(self.logit.epoch_metrics())
        for partner in self._partner_list():
            for key, value in partner.epoch_metrics().items():
                metrics[key if key not in metrics else f"{partner.name}.{key}"] = value
        return metrics


def method_display_name(cfg: MethodConfig) -> str:
    """``dckd+fitnet`` style name of a method config."""
    return "+".join([cfg.name, *(p.name for p in cfg.partners)])


def build_params(name: str, params: dict[str, Any], key: str) -> MethodParams:
    """Validate ``params`` against method ``name``'s schema; errors name the config key."""
    cls = get_method(name)
    try:
        return cls.Params.model_validate(params)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, cls.Params, prefix=key)) from e


def build_method(cfg: MethodConfig, ctx: DistillContext) -> CompositeDistiller:
    """Instantiate the configured method (and its partners) for the given models.

    A partner used alone (``name: fitnet``) is composed with ``vanilla`` (CE weight 1), the
    published baseline setting. Without a teacher (``kdlab train``) only ``vanilla`` is allowed.
    """
    logit_name, logit_params = cfg.name, cfg.params
    partner_cfgs = [(p.name, p.params, f"method.partners.{i}.params") for i, p in
                    enumerate(cfg.partners)]
    if get_method(cfg.name).kind == "partner":
        partner_cfgs.insert(0, (cfg.name, cfg.params, "method.params"))
        logit_name, logit_params = "vanilla", {}
    if ctx.teacher is None and (logit_name != "vanilla" or partner_cfgs):
        raise MethodError(
            f"method {method_display_name(cfg)!r} needs a teacher; set teacher.arch and "
            "teacher.checkpoint, or use method.name=vanilla"
        )
    logit_cls = get_method(logit_name)
    if logit_cls.kind != "logit":
        raise MethodError(f"{logit_name!r} is not a logit method; use one of "
                          f"{', '.join(list_methods('logit'))}")
    logit = logit_cls(build_params(logit_name, logit_params, "method.params"), ctx)
    partners: list[Distiller[Any]] = []
    for name, params, key in partner_cfgs:
        cls = get_method(name)
        if cls.kind != "partner":
            raise MethodError(f"partner {name!r} is a logit method; partners are "
                              f"{', '.join(list_methods('partner'))}")
        partners.append(cls(build_params(name, params, key), ctx))
    return CompositeDistiller(logit, partners)
