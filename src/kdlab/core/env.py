"""The machine and the software a figure or a run was produced on: one reader of each fact.

``/proc/cpuinfo`` is read here only (:func:`cpu_flags`, :func:`cpu_model`); runs record
:func:`environment_info` in ``env.json``, benchmarks and exports record :func:`machine_info`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from kdlab.core.torchvision_shim import shim_state
from kdlab.core.version import __version__

__all__ = ["DEPLOY_CPU_FLAGS", "NATIVE_BF16_FLAGS", "cpu_flags", "cpu_model", "cpu_supports_bf16",
           "environment_info", "git_commit", "load_average", "machine_info", "named_cpu_flags"]

#: CPU flags of native bf16 arithmetic (Linux /proc/cpuinfo names).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "avx_ne_convert"})


def _cpuinfo_field(prefix: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line starting with ``prefix``; None when the
    file cannot be read, ``""`` when no line has it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return ""


def cpu_flags() -> set[str] | None:
    """The CPU feature flags from /proc/cpuinfo, or None where that file does not exist."""
    value = _cpuinfo_field("flags")
    return None if value is None else set(value.split())


#: ``/proc/cpuinfo`` flags (as ``lscpu`` shows them) that decide fp32/bf16/int8 CPU speed.
DEPLOY_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                    "amx_tile", "amx_bf16", "amx_int8")


def named_cpu_flags(names: tuple[str, ...] = DEPLOY_CPU_FLAGS) -> dict[str, bool]:
    """Which of ``names`` the CPU has (``/proc/cpuinfo``; empty where unreadable)."""
    have = cpu_flags()
    return {} if have is None else {name: name in have for name in names}


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_supports_bf16() -> bool:
    """True when this CPU has NATIVE bf16 arithmetic (AVX512-BF16 or AMX), so bf16 autocast pays.

    oneDNN reports bf16 as supported on any AVX-512 CPU, where it is emulated and about 3x
    slower than fp32 (measured here, docs/performance.md); on Linux the CPU flags decide.
    """
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    flags = cpu_flags()
    if flags is None:
        return onednn
    return onednn and bool(flags & NATIVE_BF16_FLAGS)


def load_average() -> float:
    """The 1-minute load average (``nan`` where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return float("nan")


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Versions and hardware recorded next to every benchmark figure."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_supports_bf16(),
        "load_avg_1m": load_average(),
        "gpu": None,
    }
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        idx = device.index if device is not None and device.index is not None else 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    return info


def git_commit() -> str | None:
    """The git commit of kdlab's source tree, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info() -> dict[str, Any]:
    """Versions, hardware and git commit, recorded in every run's ``env.json``.

    ``torchvision_shim`` is :func:`kdlab.core.torchvision_shim.shim_state` at call time (whether
    kdlab's nms/roi_align stand in for torchvision's compiled ops in this process)."""
    return {
        "kdlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_supports_bf16(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torchvision_shim": shim_state(),
    }
