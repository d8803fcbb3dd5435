"""Model registry: ``create_model(name, num_classes, in_channels)`` and ``list_models()``.

Names of the form ``torchvision:NAME`` and ``timm:NAME`` are built by those libraries
(:mod:`kdlab.models.external`) instead of looked up here.

Every module of :mod:`kdlab.models` (the CIFAR and 224-px zoos included) is imported the first
time a model is looked up, so each zoo module registers its models itself; user models register
the same way from a plugin module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kdlab.core.errors import ModelError
from kdlab.core.registries import MODELS
from kdlab.models.external import create_external, split_external
from kdlab.models.output import KdModel

__all__ = ["create_model", "list_models", "register_model"]

F = TypeVar("F", bound=Callable[..., KdModel])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory ``f(num_classes, in_channels) -> KdModel``."""

    def deco(fn: F) -> F:
        MODELS.register(name, fn)
        return fn

    return deco


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return MODELS.names()


def create_model(name: str, num_classes: int = 100, in_channels: int = 3) -> KdModel:
    """Build a registered model by its community name (e.g. ``"resnet32x4"``, ``"ShuffleV1"``),
    or a torchvision/timm classifier as ``"torchvision:NAME"`` / ``"timm:NAME"`` (built by that
    library, wrapped by :func:`kdlab.models.adapter.adapt`: :mod:`kdlab.models.external`)."""

    factory = None if split_external(name) is not None else MODELS.get(name)
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ModelError(f"in_channels must be >= 1, got {in_channels}")
    if factory is None:
        model: KdModel = create_external(name, num_classes, in_channels)
    else:
        model = factory(num_classes=num_classes, in_channels=in_channels)
    model.num_classes = num_classes
    model.in_channels = in_channels
    model.arch = name
    return model
