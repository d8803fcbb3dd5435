"""224-px model zoo: ImageNet ResNets and MobileNets, and the CUB-200 variants of the CIFAR nets.

Its modules register ``resnet18_imagenet``, ``resnet34_imagenet``, ``resnet50_imagenet``,
``MobileNetV1_imagenet``, ``MobileNetV2_imagenet`` and the ``*_cub`` models with
:func:`kdlab.models.registry.register_model`; the registry imports them all on its first lookup.
"""
