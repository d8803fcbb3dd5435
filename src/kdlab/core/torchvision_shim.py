"""Import torchvision for detection; kdlab's pure-PyTorch kernels stand in for missing C++ ops.

A torchvision wheel whose compiled operators cannot load (typically a CUDA build of torchvision
next to a CPU-only torch) fails at ``import torchvision`` with "operator torchvision::nms does not
exist": ``torchvision/_meta_registrations.py`` registers fake (meta) kernels for ``nms`` and
``qnms``, whose schemas only the C++ library defines. :func:`import_torchvision` defines those
schemas itself (exactly as torchvision's C++ does) and imports again; :func:`install_kdlab_ops`
then registers :func:`kdlab.core.vision_ops.nms` and :func:`kdlab.core.vision_ops.roi_align` as the
implementations of ``torchvision::nms`` and ``torchvision::roi_align`` and tells torchvision that
its ops are present, so ``torchvision.ops.nms``, ``batched_nms``, ``roi_align``, ``RoIAlign``,
``MultiScaleRoIAlign`` and the detection models run unchanged. Where the compiled ops load, nothing
is replaced.

Only ``nms``, ``batched_nms`` and ``roi_align`` are provided; other torchvision C++ ops
(``roi_pool``, ``ps_roi_align``, ``deform_conv2d``, ...) stay unavailable.

Nothing here imports torchvision at module import time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
import threading
import types
from typing import Any

import torch
from torch import Tensor

from kdlab.core.errors import ModelError
from kdlab.core.vision_ops import nms, roi_align

__all__ = ["import_torchvision", "install_kdlab_ops", "ops_backend"]

log = logging.getLogger(__name__)

# torchvision's own schemas (torchvision/csrc/ops/nms.cpp, quantized/cpu/qnms_kernel.cpp,
# roi_align.cpp).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": ("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                  "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"),
}

_LOCK = threading.RLock()
# Library objects must stay alive for their registrations to stay in force.
_LIBRARIES: list[Any] = []
_STATE: dict[str, Any] = {"module": None, "kdlab_ops": False, "compiled": None}


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def _define(names: tuple[str, ...]) -> None:
    """Define the torchvision schemas in ``names`` that the dispatcher does not know yet."""
    missing = [name for name in names if not _has_schema(name)]
    if not missing:
        return
    try:
        lib = torch.library.Library("torchvision", "DEF")
    except RuntimeError:  # the namespace already has a DEF library: add a fragment
        lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_SCHEMAS[name])
    _LIBRARIES.append(lib)


def _compiled_ops(tv: types.ModuleType) -> bool:
    """True when torchvision's C++ library is loaded: ``_has_ops()`` and its roi_align forward
    and backward operators exist (kdlab's install never defines the backward one)."""
    return bool(tv.extension._has_ops()) and _has_schema("roi_align") and \
        _has_schema("_roi_align_backward")


def _purge_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _torch_version() -> str:
    return str(torch.__version__)


def import_torchvision() -> types.ModuleType:
    """Return the ``torchvision`` module, ready for detection on this machine.

    Contract: a plain ``import torchvision``; if it fails because the wheel's C++ operators are
    missing (a ``RuntimeError`` naming ``torchvision::``), the partly imported ``torchvision*``
    modules are dropped, the ``nms``/``qnms`` schemas are defined with torchvision's exact
    signatures, and the import is retried. If torchvision's compiled ops are then unavailable
    (``torchvision.extension._has_ops()`` is False), :func:`install_kdlab_ops` makes kdlab's
    pure-PyTorch ``nms`` and ``roi_align`` serve them. Idempotent and thread-safe.

    Raises:
        ModelError: torchvision is not installed, or cannot be imported even with the schemas.
    """
    with _LOCK:
        module = _STATE["module"]
        if module is not None:
            return module  # type: ignore[no-any-return]
        try:
            module = importlib.import_module("torchvision")
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name != "torchvision":
                _purge_torchvision()
                raise ModelError(f"torchvision is installed but its dependency {exc.name} is "
                                 f"missing: pip install {exc.name}") from None
            raise ModelError("detection needs torchvision: pip install 'kdlab[detection]' (the "
                             f"torchvision build that matches your torch {_torch_version()})"
                             ) from None
        except RuntimeError as exc:
            if "torchvision::" not in str(exc):
                _purge_torchvision()
                raise ModelError(f"torchvision {_installed_version('torchvision')} fails to import "
                                 f"({str(exc).splitlines()[0] if str(exc) else exc!r}): install "
                                 "the torchvision build that matches your torch "
                                 f"{_torch_version()}") from None
            log.debug("torchvision's C++ ops did not load (%s); defining their schemas", exc)
            _purge_torchvision()
            _define(("nms", "qnms"))
            try:
                module = importlib.import_module("torchvision")
            except RuntimeError as exc2:
                _purge_torchvision()
                raise ModelError(f"torchvision {_installed_version('torchvision')} cannot be "
                                 f"imported next to torch {_torch_version()} ({exc2}): install "
                                 "the torchvision build that matches your torch") from None
        if _STATE["compiled"] is None:
            _STATE["compiled"] = _compiled_ops(module)
        if not _STATE["compiled"]:
            install_kdlab_ops()
        _STATE["module"] = module
        return module


def _nms_kernel(dets: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return nms(dets, scores, iou_threshold)


def _roi_align_kernel(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                      pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:

    return roi_align(input, rois, (int(pooled_height), int(pooled_width)), spatial_scale,
                     sampling_ratio, aligned)


def install_kdlab_ops() -> None:
    """Serve ``torchvision::nms`` and ``torchvision::roi_align`` with kdlab's pure-PyTorch kernels.

    Contract: ``nms`` gets a CompositeExplicitAutograd kernel (every device; its output is an
    index tensor, no gradient); ``roi_align`` (schema defined as torchvision's C++ does if
    missing) gets a CompositeImplicitAutograd kernel, so autograd differentiates through
    :func:`kdlab.core.vision_ops.roi_align` on any device. ``torchvision.extension._has_ops`` and
    the copy ``torchvision.ops.roi_align`` imported by value are set to return True, so
    torchvision dispatches to these ops instead of raising or using its slow Python fallback.
    Does nothing where torchvision's compiled ops work, or when already installed.
    """
    with _LOCK:
        if _STATE["kdlab_ops"]:
            return
        tv = sys.modules.get("torchvision")
        if tv is None:
            import_torchvision()  # installs (or finds the compiled ops)
            return
        if _STATE["compiled"] is None:
            _STATE["compiled"] = _compiled_ops(tv)
        if _STATE["compiled"]:
            return
        _define(("nms", "qnms", "roi_align"))
        lib = torch.library.Library("torchvision", "IMPL")
        lib.impl("nms", _nms_kernel, "CompositeExplicitAutograd")
        lib.impl("roi_align", _roi_align_kernel, "CompositeImplicitAutograd")
        _LIBRARIES.append(lib)

        def _has_ops() -> bool:
            return True

        tv.extension._has_ops = _has_ops
        for name in [m for m in sys.modules if m.startswith("torchvision.")]:
            mod = sys.modules[name]
            if mod is not None and mod is not tv.extension and "_has_ops" in vars(mod):
                mod._has_ops = _has_ops
        importlib.import_module("torchvision.ops.roi_align")._has_ops = _has_ops
        _STATE["kdlab_ops"] = True
        log.debug("torchvision %s: nms and roi_align served by kdlab's pure-PyTorch kernels",
                 getattr(tv, "__version__", "?"))


def _installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def ops_backend() -> dict[str, str]:
    """Which detection backends this process uses; never raises.

    Returns ``{"torchvision": version | "not installed" | "<version> (unusable: ...)",
    "nms": ..., "roi_align": ..., "pycocotools": version | "not installed"}`` where the op
    entries are ``"kdlab (pure PyTorch)"`` or ``"torchvision (compiled)"`` (absent when
    torchvision is missing or unusable). Imports torchvision (through
    :func:`import_torchvision`) only when it is installed.
    """
    info: dict[str, str] = {}
    try:
        tv_version = _installed_version("torchvision")
        if tv_version == "not installed":
            info["torchvision"] = tv_version
        else:
            try:
                tv = import_torchvision()
                info["torchvision"] = str(getattr(tv, "__version__", tv_version))
                backend = ("kdlab (pure PyTorch)" if _STATE["kdlab_ops"]
                           else "torchvision (compiled)")
                info["nms"] = backend
                info["roi_align"] = backend
            except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                info["torchvision"] = f"{tv_version} (unusable: {first})"
    except Exception as exc:  # noqa: BLE001
        info["torchvision"] = f"unknown ({type(exc).__name__})"
    try:
        info["pycocotools"] = _installed_version("pycocotools")
    except Exception as exc:  # noqa: BLE001
        info["pycocotools"] = f"unknown ({type(exc).__name__})"
    return info
