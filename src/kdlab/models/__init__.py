"""Model zoo: CIFAR classifiers under their community names, all returning :class:`ModelOutput`;
torchvision and timm classifiers as ``torchvision:NAME`` / ``timm:NAME``."""

from kdlab.models.checkpoint import load_checkpoint, read_checkpoint
from kdlab.models.external import load_pretrained
from kdlab.models.output import KdModel, ModelOutput
from kdlab.models.registry import create_model, list_models, register_model

__all__ = [
    "KdModel",
    "ModelOutput",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_pretrained",
    "read_checkpoint",
    "register_model",
]
