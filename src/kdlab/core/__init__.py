"""The base layer: what every other layer of kdlab may import, importing nothing of kdlab above it.

* :mod:`~kdlab.core.errors`: the exception types; :mod:`~kdlab.core.registry`: the generic
  :class:`~kdlab.core.registry.Registry`; :mod:`~kdlab.core.registries`: every registry instance
  (models, datasets, methods, tasks, optimizers, schedules, loggers) with lazy discovery;
  :mod:`~kdlab.core.plugins`: user plugin modules.
* :mod:`~kdlab.core.io`: atomic writes and file digests; :mod:`~kdlab.core.distributed`:
  torchrun helpers; :mod:`~kdlab.core.runtime`: devices, autocast, seeds, threads;
  :mod:`~kdlab.core.env`: the machine and library versions.
* :mod:`~kdlab.core.vision_ops` and :mod:`~kdlab.core.torchvision_shim`: pure-PyTorch detection
  kernels and the opt-in shim that registers them for a torchvision whose operators cannot load.

Nothing is imported here, so ``import kdlab.core.errors`` stays light.
"""
