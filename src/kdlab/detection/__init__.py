"""Object detection: Faster R-CNN FPN distillation on COCO-format data (docs/detection.md).

* :mod:`~kdlab.detection.ops`: pure-PyTorch ``nms``, ``batched_nms`` and ``roi_align`` equal to
  torchvision's compiled kernels; :mod:`~kdlab.detection.torchvision_ops` imports torchvision and
  registers them where its own operators cannot load.
* :mod:`~kdlab.detection.coco` (reader/writer), :mod:`~kdlab.detection.synthetic`,
  :mod:`~kdlab.detection.voc`, :mod:`~kdlab.detection.trees`: COCO-format datasets;
  :mod:`~kdlab.detection.data`: batches and loaders.
* :mod:`~kdlab.detection.model`: the detector and the distillation forward pass (RoI logits of
  student and teacher on the same proposals, SDD's RoI regions).
* :mod:`~kdlab.detection.evaluation`, :mod:`~kdlab.detection.predict`: COCO mAP (pycocotools).

The task itself is :mod:`kdlab.tasks.detection`. Importing this package imports neither
torchvision nor pycocotools (each module imports them when it needs them); classification code
never imports it, except ``torchvision:`` archs, which use :mod:`~kdlab.detection.torchvision_ops`.
"""
