"""224-px model zoo: ImageNet ResNets and MobileNets, and the CUB-200 variants of the CIFAR nets.

Importing this package registers ``resnet18_imagenet``, ``resnet34_imagenet``,
``resnet50_imagenet``, ``MobileNetV1_imagenet``, ``MobileNetV2_imagenet`` and the ``*_cub`` models
with :func:`kdlab.models.registry.register_model`.
"""

from kdlab.models.imagenet import cub, mobilenet, resnet  # noqa: F401
