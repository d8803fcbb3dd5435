"""kdlab: knowledge distillation lab.

Scale Decoupled Distillation (SDD, Wei, Luo & Luo, CVPR 2024) and Decoupled Classifier
Knowledge Distillation (DCKD, Wang, Dong, Zhu & Li, PLOS ONE 2025), with their base and
partner methods, a CIFAR model zoo, data pipelines, a resumable trainer and a CLI.
"""

from __future__ import annotations

from kdlab.core.errors import KdlabError
from kdlab.core.version import __version__

TYPE_CHECKING = False  # typing itself is not imported: it would double `import kdlab`'s time
if TYPE_CHECKING:
    from typing import Any

    from kdlab.api import load_student, run


__all__ = ["KdlabError", "__version__", "load_student", "run"]

#: the Python API (:mod:`kdlab.api`), imported at first use so that ``import kdlab`` stays light.
_API = frozenset({"run", "load_student"})


def __getattr__(name: str) -> Any:
    if name in _API:
        # PEP 562 lazy attribute: `import kdlab` stays light (no torch until the API is used)
        from kdlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
