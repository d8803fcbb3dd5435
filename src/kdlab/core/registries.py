"""Every registry of kdlab, in the base layer so that any layer can look a name up.

Each registry discovers its entries lazily: the first lookup imports the packages or modules
named here (:class:`~kdlab.core.registry.Registry`), whose entries register themselves with the
decorators of their own package (``@register_model``, ``@register_method``, ...). So the
config layer checks a method, model or optimizer name through these registries without
importing the layers that define them, and a plugin's entries appear in the same place.

The entries' types are described in words rather than imported: the classes live in the
layers above.
"""

from __future__ import annotations

from typing import Any

from kdlab.core.errors import ConfigError, DatasetError, MethodError, ModelError
from kdlab.core.registry import Registry

__all__ = [
    "DATASETS", "EXTERNAL_MODEL_LIBRARIES", "LOGGERS", "METHODS", "MODELS", "OPTIMIZERS",
    "SCHEDULES", "TASKS", "split_external",
]

#: model factories ``f(num_classes, in_channels) -> KdModel`` (:mod:`kdlab.models`).
MODELS: Registry[Any] = Registry(
    "model", ModelError, packages=("kdlab.models",), list_hint="kdlab models")
#: in-memory dataset loaders ``(root, train, download, **options)`` (:mod:`kdlab.data`).
DATASETS: Registry[Any] = Registry("dataset", DatasetError, packages=("kdlab.data",))
#: distiller classes by ``cls.name`` (:mod:`kdlab.methods`).
METHODS: Registry[Any] = Registry(
    "method", MethodError, packages=("kdlab.methods",), list_hint="kdlab methods")
#: task classes by ``cls.name`` (:mod:`kdlab.tasks`).
TASKS: Registry[Any] = Registry("task", ConfigError, packages=("kdlab.tasks",))
#: training optimizers by ``cls.name`` (:mod:`kdlab.engine.optimizers`).
OPTIMIZERS: Registry[Any] = Registry(
    "optimizer", ConfigError, packages=("kdlab.engine.optimizers",))
#: learning-rate schedules by ``cls.name`` (:mod:`kdlab.engine.schedules`).
SCHEDULES: Registry[Any] = Registry(
    "scheduler", ConfigError, packages=("kdlab.engine.schedules",))
#: metrics loggers by ``cls.name`` (:mod:`kdlab.engine.loggers`).
LOGGERS: Registry[Any] = Registry("logger", ConfigError, packages=("kdlab.engine.loggers",))

#: prefixes of model names built by another library (``torchvision:resnet18``).
EXTERNAL_MODEL_LIBRARIES = ("torchvision", "timm")


def split_external(arch: str) -> tuple[str, str] | None:
    """``("torchvision", "resnet18")`` for ``"torchvision:resnet18"`` (or ``timm:``); None for a
    name of kdlab's own zoo. An empty name after the prefix is a :class:`ModelError`."""
    library, sep, name = arch.partition(":")
    if not sep or library not in EXTERNAL_MODEL_LIBRARIES:
        return None
    if not name:
        raise ModelError(f"arch {arch!r} names no model; write {library}:MODEL_NAME")
    return library, name
