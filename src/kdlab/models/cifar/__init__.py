"""CIFAR model zoo (CRD / mdistiller definitions, parameter names identical).

Every module of this package registers its models with
:func:`kdlab.models.registry.register_model`; the registry imports them all on its first lookup.
"""
