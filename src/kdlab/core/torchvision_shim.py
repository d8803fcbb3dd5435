"""Import torchvision; for detection only, kdlab's pure-PyTorch kernels may stand in for its
missing compiled ``nms`` / ``roi_align`` (the "torchvision shim", docs/torchvision-shim.md).

A torchvision wheel whose compiled operators cannot load (typically a CUDA build of torchvision
next to a CPU-only torch) fails at ``import torchvision`` with "operator torchvision::nms does not
exist": ``torchvision/_meta_registrations.py`` registers fake (meta) kernels for ``nms`` and
``qnms``, whose schemas only the C++ library defines.

* :func:`import_torchvision` is the plain import, used for ``torchvision:NAME`` classifiers: it
  never installs anything, and a wheel whose operators do not load is a one-line
  :class:`TorchvisionOpsMissing` that says which build to install.
* :func:`import_torchvision_for_detection` is what the detector calls. Under the policy of the
  environment variable ``KDLAB_TORCHVISION_SHIM`` (:func:`shim_policy`: ``auto``, the default, or
  ``off``) it installs the shim only when torchvision's compiled operators do not load AND torch
  has no CUDA: it defines the missing schemas exactly as torchvision's C++ does, imports again,
  registers :func:`kdlab.core.vision_ops.nms` and :func:`kdlab.core.vision_ops.roi_align` as the
  kernels of ``torchvision::nms`` and ``torchvision::roi_align``, and claims those two ops (only
  them) in the torchvision modules that host them, so ``torchvision.ops.nms``, ``batched_nms``,
  ``roi_align``, ``RoIAlign``, ``MultiScaleRoIAlign`` and the detection models run unchanged. It
  logs one WARNING per process when it does so.

Other torchvision C++ ops (``roi_pool``, ``ps_roi_align``, ``ps_roi_pool``, ``deform_conv2d``)
keep torchvision's own "Couldn't load custom C++ ops" error, because ``torchvision.extension``'s
``_has_ops()`` stays False. :func:`shim_state` (recorded in every run's ``env.json`` and shown by
``kdlab doctor``) says what this process did. The shim is process-wide and cannot be undone.

Nothing here imports torchvision at module import time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
import threading
import types
from typing import Any

import torch
from torch import Tensor

from kdlab.core.errors import ConfigError, ModelError
from kdlab.core.vision_ops import nms, roi_align

__all__ = ["ENV_VAR", "KDLAB_OPS", "POLICIES", "TorchvisionOpsMissing", "import_torchvision",
           "import_torchvision_for_detection", "ops_backend", "shim_policy", "shim_state"]

log = logging.getLogger(__name__)

#: the environment variable of the shim's policy.
ENV_VAR = "KDLAB_TORCHVISION_SHIM"
#: its values: ``auto`` (default) installs the shim for detection where it is needed, ``off``
#: never does.
POLICIES = ("auto", "off")
#: the torchvision operators the shim serves with kdlab's kernels (``batched_nms`` uses ``nms``).
KDLAB_OPS = ("nms", "roi_align")

# torchvision's own schemas (torchvision/csrc/ops/nms.cpp, quantized/cpu/qnms_kernel.cpp,
# roi_align.cpp).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": ("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                  "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"),
}
# The torchvision modules whose functions call KDLAB_OPS: their imported-by-value copies of
# ``_has_ops`` / ``_assert_has_ops`` are replaced; ``torchvision.extension``'s stay as they are.
_CLAIMED_MODULES = ("torchvision.ops.boxes", "torchvision.ops.roi_align")

_LOCK = threading.RLock()
# Library objects must stay alive for their registrations to stay in force.
_LIBRARIES: list[Any] = []
_STATE: dict[str, Any] = {"module": None, "kdlab_ops": False, "compiled": None, "reason": None}


class TorchvisionOpsMissing(ModelError):
    """torchvision is installed, but its compiled operators do not load with this torch."""


def shim_policy() -> str:
    """The policy in ``KDLAB_TORCHVISION_SHIM``: ``"auto"`` (also when unset or empty) or ``"off"``.

    Raises:
        ConfigError: any other value.
    """
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower() or "auto"
    if value not in POLICIES:
        raise ConfigError(f"environment variable {ENV_VAR}={raw!r} is not one of "
                          f"{', '.join(POLICIES)} (auto: kdlab's nms/roi_align stand in for "
                          "torchvision's compiled ops in detection where those cannot load; "
                          "off: never)")
    return value


def _cuda_torch() -> bool:
    """True for a CUDA build of torch or where a GPU is visible: the shim never acts there."""
    return torch.version.cuda is not None or torch.cuda.is_available()


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


def _torchvision_modules() -> set[str]:
    return {m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")}


def _purge_torchvision(keep: set[str]) -> None:
    """Drop the ``torchvision*`` modules a failed import left behind (all but ``keep``)."""
    for name in _torchvision_modules() - keep:
        del sys.modules[name]


def _installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _names_missing_op(exc: BaseException) -> bool:
    """True for the import errors of a torchvision whose C++ operators did not load."""
    return isinstance(exc, RuntimeError) and "torchvision::" in str(exc)


def _install_hint() -> str:
    """The pip command of the torchvision wheel for this torch's build (CPU or CUDA X.Y)."""
    version = _installed_version("torchvision")
    pin = "" if version == "not installed" else f"=={version.split('+')[0]}"
    cuda = torch.version.cuda
    index = f"cu{cuda.replace('.', '')}" if cuda else "cpu"
    return (f"pip install --no-deps torchvision{pin} --index-url "
            f"https://download.pytorch.org/whl/{index}")


def _ops_missing_message(detail: str) -> str:
    """The one-line message for a torchvision whose compiled operators do not load."""
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    return (f"torchvision {_installed_version('torchvision')}'s compiled operators do not load "
            f"with torch {torch.__version__} ({detail}): install the torchvision build made for "
            f"this {build} torch, e.g. {_install_hint()}")


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, plainly: never installs the shim (classification uses this).

    Contract: returns the ``torchvision`` module, the one already imported if any (in a process
    where detection installed the shim, that one). A failed import leaves no ``torchvision*``
    module behind. Thread-safe.

    Raises:
        ModuleNotFoundError: torchvision, or a package it needs, is not installed (the caller
            says what to install for its use).
        TorchvisionOpsMissing: its compiled operators do not load with this torch (the message
            names the wheel to install).
        ModelError: it fails to import for another reason.
    """
    with _LOCK:
        before = _torchvision_modules()
        try:
            return importlib.import_module("torchvision")
        except ModuleNotFoundError:
            _purge_torchvision(keep=before)
            raise
        except Exception as exc:  # a build compiled for another torch fails in many ways
            _purge_torchvision(keep=before)
            if _names_missing_op(exc):
                raise TorchvisionOpsMissing(_ops_missing_message(_first_line(exc))) from exc
            raise ModelError(f"torchvision {_installed_version('torchvision')} fails to import "
                             f"({_first_line(exc)}): install the torchvision build that matches "
                             f"your torch {torch.__version__}") from exc


def _refusal(policy: str) -> str | None:
    """Why the shim may not be installed now (None: it may)."""
    if policy == "off":
        return f"{ENV_VAR}=off keeps kdlab's pure-PyTorch nms/roi_align out"
    if _cuda_torch():
        return "kdlab's pure-PyTorch nms/roi_align never stand in for them on a CUDA torch"
    return None


def import_torchvision_for_detection() -> types.ModuleType:
    """Return ``torchvision`` for the detector, with kdlab's ``nms``/``roi_align`` standing in
    for its compiled operators where the policy allows it.

    Contract: a plain :func:`import_torchvision` first. Where the compiled operators are missing
    (the import fails naming ``torchvision::``, or ``torchvision.extension._has_ops()`` is
    False), policy ``auto`` on a torch without CUDA installs the shim: the ``nms``/``qnms``
    schemas are defined with torchvision's exact signatures, the import is retried, kdlab's
    kernels serve ``torchvision::nms`` and ``torchvision::roi_align``, and one WARNING is
    logged per process. Policy ``off``, or a CUDA torch, never installs it: a failed import is
    a one-line ModelError, and a torchvision that imports without its ops is returned as it is
    (its own errors then surface). Idempotent and thread-safe; the policy is read on each call.

    Raises:
        ConfigError: ``KDLAB_TORCHVISION_SHIM`` is neither ``auto`` nor ``off``.
        ModelError: torchvision is not installed, or cannot be imported (with the shim where it
            may be installed).
    """
    with _LOCK:
        policy = shim_policy()
        module = _STATE["module"]
        if module is not None:
            return module  # type: ignore[no-any-return]
        reason = "torchvision.extension._has_ops() is False"
        try:
            module = import_torchvision()
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.split(".")[0] != "torchvision":
                raise ModelError(f"torchvision is installed but its dependency {exc.name} is "
                                 f"missing: pip install {exc.name}") from None
            raise ModelError("detection needs torchvision: pip install -e '.[detection]' (the "
                             f"torchvision build that matches your torch {torch.__version__})"
                             ) from None
        except TorchvisionOpsMissing as exc:
            refusal = _refusal(policy)
            if refusal is not None:
                raise ModelError(f"detection: {exc} ({refusal})") from None
            reason = _first_line(exc.__cause__) if exc.__cause__ is not None else str(exc)
            log.debug("torchvision's C++ ops did not load (%s); defining their schemas", reason)
            _define(("nms", "qnms"))
            before = _torchvision_modules()
            try:
                module = importlib.import_module("torchvision")
            except Exception as exc2:  # noqa: BLE001 - any failure here is the same advice
                _purge_torchvision(keep=before)
                raise ModelError(f"torchvision {_installed_version('torchvision')} cannot be "
                                 f"imported next to torch {torch.__version__} even with kdlab's "
                                 f"op schemas ({_first_line(exc2)}): install the torchvision "
                                 f"build made for this torch, e.g. {_install_hint()}") from None
        if _STATE["compiled"] is None:
            _STATE["compiled"] = _compiled_ops(module)
        if not _STATE["compiled"]:
            refusal = _refusal(policy)
            if refusal is None:
                _install_kdlab_ops(module, reason)
            else:
                log.info("torchvision's compiled ops are missing and %s", refusal)
        _STATE["module"] = module
        return module


def _nms_kernel(dets: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return nms(dets, scores, iou_threshold)


def _roi_align_kernel(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                      pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    return roi_align(input, rois, (int(pooled_height), int(pooled_width)), spatial_scale,
                     sampling_ratio, aligned)


def _kdlab_has_ops() -> bool:
    """``_has_ops`` of the modules in ``_CLAIMED_MODULES``: their ops (nms, roi_align) exist."""
    return True


def _kdlab_assert_has_ops() -> None:
    """``_assert_has_ops`` of the modules in ``_CLAIMED_MODULES``: nothing to assert."""


def _install_kdlab_ops(tv: types.ModuleType, reason: str) -> None:
    """Serve ``torchvision::nms`` and ``torchvision::roi_align`` with kdlab's pure-PyTorch kernels.

    Contract: ``nms`` gets a CompositeExplicitAutograd kernel (every device; its output is an
    index tensor, no gradient); ``roi_align`` (schema defined as torchvision's C++ does if
    missing) gets a CompositeImplicitAutograd kernel, so autograd differentiates through
    :func:`kdlab.core.vision_ops.roi_align` on any device. Only ``torchvision.ops.boxes`` and
    ``torchvision.ops.roi_align`` are told that their ops exist (their copies of ``_has_ops`` /
    ``_assert_has_ops``), so torchvision dispatches nms and roi_align to these kernels instead of
    raising or using its slow Python fallback, while every other op keeps torchvision's own
    error. Logs one WARNING (``reason``: why the compiled ops are missing). Runs once per process.
    """
    with _LOCK:
        if _STATE["kdlab_ops"]:
            return
        _define(("nms", "qnms", "roi_align"))
        lib = torch.library.Library("torchvision", "IMPL")
        lib.impl("nms", _nms_kernel, "CompositeExplicitAutograd")
        lib.impl("roi_align", _roi_align_kernel, "CompositeImplicitAutograd")
        _LIBRARIES.append(lib)
        for name in _CLAIMED_MODULES:
            mod = importlib.import_module(name)
            if "_has_ops" in vars(mod):
                mod._has_ops = _kdlab_has_ops  # type: ignore[attr-defined]
            if "_assert_has_ops" in vars(mod):
                mod._assert_has_ops = _kdlab_assert_has_ops  # type: ignore[attr-defined]
        _STATE["kdlab_ops"] = True
        _STATE["reason"] = reason
        log.warning("torchvision %s's compiled operators do not load with torch %s (%s): "
                    "kdlab's pure-PyTorch nms and roi_align stand in for them in detection "
                    "(same semantics, slower; torchvision's other compiled ops stay "
                    "unavailable). Install the matching torchvision build (%s) to use its own, "
                    "or set %s=off to turn this stand-in off", getattr(tv, "__version__", "?"),
                    torch.__version__, reason, _install_hint(), ENV_VAR)


def shim_state() -> dict[str, Any]:
    """What this process did about torchvision's ops; never raises, never imports torchvision.

    Returns ``{"policy": "auto" | "off" | "invalid: '<value>'", "installed": bool,
    "kdlab_ops": ["nms", "roi_align"] when installed else [], "compiled_ops": True | False |
    None (None: torchvision not imported for detection yet in this process), "reason": why the
    compiled ops are missing (None unless installed), "torchvision": installed version |
    "not installed"}``.
    """
    try:
        policy = shim_policy()
    except ConfigError:
        policy = f"invalid: {os.environ.get(ENV_VAR)!r}"
    installed = bool(_STATE["kdlab_ops"])
    return {"policy": policy, "installed": installed,
            "kdlab_ops": list(KDLAB_OPS) if installed else [],
            "compiled_ops": _STATE["compiled"], "reason": _STATE["reason"],
            "torchvision": _installed_version("torchvision")}


def ops_backend() -> dict[str, str]:
    """Which detection backends this process uses; never raises.

    Returns ``{"torchvision": version | "not installed" | "<version> (unusable: ...)",
    "nms": ..., "roi_align": ..., "pycocotools": version | "not installed"}`` where the op
    entries are ``"kdlab (pure PyTorch)"``, ``"torchvision (compiled)"`` or ``"missing
    (torchvision's compiled ops do not load)"`` (absent when torchvision is missing or
    unusable). Imports torchvision through :func:`import_torchvision_for_detection` (so its
    policy applies) only when it is installed.
    """
    info: dict[str, str] = {}
    try:
        tv_version = _installed_version("torchvision")
        if tv_version == "not installed":
            info["torchvision"] = tv_version
        else:
            try:
                tv = import_torchvision_for_detection()
                info["torchvision"] = str(getattr(tv, "__version__", tv_version))
                backend = ("kdlab (pure PyTorch)" if _STATE["kdlab_ops"]
                           else "torchvision (compiled)" if _STATE["compiled"]
                           else "missing (torchvision's compiled ops do not load)")
                info["nms"] = backend
                info["roi_align"] = backend
            except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail
                info["torchvision"] = f"{tv_version} (unusable: {_first_line(exc)})"
    except Exception as exc:  # noqa: BLE001
        info["torchvision"] = f"unknown ({type(exc).__name__})"
    try:
        info["pycocotools"] = _installed_version("pycocotools")
    except Exception as exc:  # noqa: BLE001
        info["pycocotools"] = f"unknown ({type(exc).__name__})"
    return info
