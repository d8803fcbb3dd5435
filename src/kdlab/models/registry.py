"""Model registry: ``create_model(name, num_classes, in_channels)`` and ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kdlab.errors import ModelError
from kdlab.models.output import KdModel

_MODELS: dict[str, Callable[..., KdModel]] = {}

F = TypeVar("F", bound=Callable[..., KdModel])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory ``f(num_classes, in_channels) -> KdModel``."""

    def deco(fn: F) -> F:
        if name in _MODELS:
            raise ModelError(f"model name {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    _ensure_loaded()
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 100, in_channels: int = 3) -> KdModel:
    """Build a registered model by its community name (e.g. ``"resnet32x4"``, ``"ShuffleV1"``)."""
    _ensure_loaded()
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ModelError(f"in_channels must be >= 1, got {in_channels}")
    model = _MODELS[name](num_classes=num_classes, in_channels=in_channels)
    model.num_classes = num_classes
    model.in_channels = in_channels
    model.arch = name
    return model


def _ensure_loaded() -> None:
    # Importing the zoo modules runs their @register_model decorators.
    import kdlab.models.cifar  # noqa: F401
    import kdlab.models.imagenet  # noqa: F401
