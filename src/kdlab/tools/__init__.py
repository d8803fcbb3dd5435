"""Tools that write data sets in the formats kdlab reads (not needed to train or evaluate).

* :mod:`~kdlab.tools.synthetic_detection`: the synthetic Fashion-MNIST detection set;
* :mod:`~kdlab.tools.voc`: Pascal VOC to COCO format;
* :mod:`~kdlab.tools.trees`: the NEON tree-crown set (DeepForest's package data) to COCO format.
"""
