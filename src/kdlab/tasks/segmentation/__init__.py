"""Semantic segmentation: the task (:mod:`~kdlab.tasks.segmentation.task`), the segmentation
models (:mod:`~kdlab.tasks.segmentation.model`), the data sets in their on-disk layouts
(:mod:`~kdlab.tasks.segmentation.datasets`), the seeded training augmentation
(:mod:`~kdlab.tasks.segmentation.transforms`), the loaders (:mod:`~kdlab.tasks.segmentation.data`),
the confusion-matrix metrics (:mod:`~kdlab.tasks.segmentation.metrics`) and the synthetic
Fashion-MNIST set (:mod:`~kdlab.tasks.segmentation.synthetic`). See docs/segmentation.md.

Importing this package does not import torchvision (the model module imports it when it builds
a head).
"""
