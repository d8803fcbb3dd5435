"""CIFAR model zoo (CRD / mdistiller definitions, parameter names identical).

Importing this package registers every model with :func:`kdlab.models.registry.register_model`.
"""

from kdlab.models.cifar import (  # noqa: F401
    mobilenetv2,
    resnet,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
