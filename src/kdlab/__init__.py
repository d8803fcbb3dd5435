"""kdlab: knowledge distillation lab.

Scale Decoupled Distillation (SDD, Wei, Luo & Luo, CVPR 2024) and Decoupled Classifier
Knowledge Distillation (DCKD, Wang, Dong, Zhu & Li, PLOS ONE 2025), with their base and
partner methods, a CIFAR model zoo, data pipelines, a resumable trainer and a CLI.
"""

from kdlab.errors import KdlabError

__version__ = "0.2.0"

__all__ = ["KdlabError", "__version__"]
