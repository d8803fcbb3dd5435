"""Object detection: the task (:mod:`~kdlab.tasks.detection.task`), the detector and its
distillation forward pass (:mod:`~kdlab.tasks.detection.model`), COCO-format data
(:mod:`~kdlab.tasks.detection.coco`, :mod:`~kdlab.tasks.detection.data`), COCO mAP
(:mod:`~kdlab.tasks.detection.evaluation`) and prediction (:mod:`~kdlab.tasks.detection.predict`).

Importing this package imports neither torchvision nor pycocotools (each module imports them
when it needs them).
"""
