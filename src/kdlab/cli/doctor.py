"""``kdlab doctor``: what this machine offers a run, and whether a run can be kept safe here.

The report has three parts:

* **environment**: kdlab/torch/Python versions, the torch build (CPU-only or CUDA version), CPU
  bf16 support, threads, GPUs with their memory, and **detection**: the torchvision and
  pycocotools versions, which ``nms``/``roi_align`` detection uses (kdlab's pure-PyTorch
  kernels or torchvision's compiled ones) and the torchvision shim's policy and state;
* **datasets**: where Fashion-MNIST and CIFAR-10/100 were found (``$KDLAB_DATA``, ``./data``,
  Debian's ``/usr/share/datasets/fashion-mnist``);
* **checks**, each ``ok``, ``warn`` or ``fail``: the run directory can be created and written, a
  file there can be fsynced and atomically renamed (what checkpointing relies on), there is free
  disk for ``N`` training checkpoints of the largest model, and, with ``--config``, that the
  config is valid and its teacher checkpoint is readable with ``weights_only=True``.

A failed check makes ``kdlab doctor`` exit with status 1; warnings do not. Nothing here prints:
:func:`format_table` and :meth:`DoctorReport.to_dict` give the CLI what to write.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kdlab.config import load_config
from kdlab.core import torchvision_shim
from kdlab.core.env import cpu_supports_bf16
from kdlab.core.errors import KdlabError
from kdlab.core.version import __version__
from kdlab.data.cifar import find_cifar_folder
from kdlab.data.dataset import default_data_root
from kdlab.data.fashion_mnist import fashion_mnist_candidates, find_fashion_mnist
from kdlab.models import create_model
from kdlab.models.checkpoint import extract_state_dict, read_checkpoint

__all__ = ["Check", "DoctorReport", "checkpoint_bytes", "format_table", "run_doctor"]

Status = Literal["ok", "warn", "fail"]

#: the largest network of the model zoo (23.7M parameters): the default size estimate.
LARGEST_MODEL = "ResNet50"
#: a training checkpoint holds the student's fp32 weights and SGD's momentum buffers.
BYTES_PER_PARAM_IN_CHECKPOINT = 8


@dataclass
class Check:
    """One check: a short name, ``ok``/``warn``/``fail`` and a one-line detail."""

    name: str
    status: Status
    detail: str


@dataclass
class DoctorReport:
    """Everything ``kdlab doctor`` found."""

    environment: dict[str, Any]
    datasets: list[dict[str, Any]]
    disk: list[dict[str, Any]]
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when at least one check failed."""
        return any(c.status == "fail" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``kdlab doctor --json``)."""
        return {"environment": self.environment, "datasets": self.datasets, "disk": self.disk,
                "checks": [asdict(c) for c in self.checks], "ok": not self.failed}


# --------------------------------------------------------------------------- facts
def environment() -> dict[str, Any]:
    """Versions, torch build, CPU bf16, threads and GPUs (name, memory in GiB)."""

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name,
                         "memory_gib": round(props.total_memory / 2**30, 1)})
    return {
        "kdlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only",
        "cuda_available": torch.cuda.is_available(),
        "cpu_bf16": cpu_supports_bf16(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "detection": detection(),
    }


def detection() -> dict[str, str]:
    """torchvision / pycocotools versions, which nms and roi_align detection uses (kdlab's
    pure-PyTorch kernels or torchvision's compiled ones), and the torchvision shim's
    ``shim_policy`` (``KDLAB_TORCHVISION_SHIM``) and ``shim_installed`` ("yes: nms, roi_align"
    or "no"). torchvision is imported for detection (its policy applies) only when it is
    installed, and this never raises."""
    try:
        info = torchvision_shim.ops_backend()
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail
        info = {"torchvision": f"unknown ({type(exc).__name__}: {exc})"}
    try:
        state = torchvision_shim.shim_state()
        info["shim_policy"] = str(state["policy"])
        info["shim_installed"] = (f"yes: {', '.join(state['kdlab_ops'])}" if state["installed"]
                                  else "no")
    except Exception as exc:  # noqa: BLE001
        info["shim_policy"] = f"unknown ({type(exc).__name__}: {exc})"
    return info


def datasets() -> list[dict[str, Any]]:
    """Where each small dataset was found (``path`` None when it was not)."""

    found: list[dict[str, Any]] = []
    fm = find_fashion_mnist(None, train=True)
    found.append({"name": "fashion_mnist", "path": None if fm is None else str(fm[0].parent),
                  "searched": [str(p) for p in fashion_mnist_candidates(None)]})
    root = default_data_root()
    for name in ("cifar10", "cifar100"):
        try:
            folder = find_cifar_folder(root, name)
        except (KdlabError, OSError):
            folder = None
        found.append({"name": name, "path": None if folder is None else str(folder),
                      "searched": [str(root)]})
    return found


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free(path: Path) -> dict[str, Any]:
    """Free and total bytes of the filesystem that holds (or would hold) ``path``."""
    where = _existing_ancestor(path)
    usage = shutil.disk_usage(where)
    return {"path": str(path), "measured_at": str(where), "free_bytes": usage.free,
            "total_bytes": usage.total}


def checkpoint_bytes(arch: str, num_classes: int = 100, in_channels: int = 3) -> int:
    """Estimated size of one training checkpoint of ``arch`` (weights + momentum, fp32).

    The model is built on the ``meta`` device, so no memory is allocated.
    """

    with torch.device("meta"):
        model = create_model(arch, num_classes=num_classes, in_channels=in_channels)
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return BYTES_PER_PARAM_IN_CHECKPOINT * n


# --------------------------------------------------------------------------- checks
def check_writable(run_dir: Path) -> Check:
    """Write, fsync, rename and delete a probe file where the run's checkpoints would go."""
    name = "run directory writable, fsync and rename work"
    target = run_dir if run_dir.exists() else _existing_ancestor(run_dir)
    if not target.is_dir():
        return Check(name, "fail", f"{target} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kdlab-doctor-", dir=target)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"kdlab doctor probe\n" * 64)
                f.flush()
                os.fsync(f.fileno())
            final = tmp + ".done"
            os.replace(tmp, final)
            dfd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            os.unlink(final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        return Check(name, "fail", f"{target}: {e.strerror or e}")
    where = "" if target == run_dir else f" (checked in {target}; {run_dir} will be created)"
    return Check(name, "ok", f"{run_dir}{where}")


def check_free_disk(run_dir: Path, arch: str, n_checkpoints: int) -> Check:
    """Enough free disk for ``n_checkpoints`` training checkpoints of ``arch``?"""
    name = f"free disk for {n_checkpoints} checkpoints of {arch}"
    try:
        per = checkpoint_bytes(arch)
    except (KdlabError, RuntimeError, TypeError, ValueError) as e:
        return Check(name, "warn", f"cannot estimate the checkpoint size of {arch}: {e}")
    need = per * n_checkpoints
    free = disk_free(run_dir)["free_bytes"]
    detail = f"need ~{_human(need)} ({_human(per)} each), {_human(free)} free"
    if free < need:
        return Check(name, "fail", detail)
    if free < 2 * need:
        return Check(name, "warn", detail + " (less than twice what is needed)")
    return Check(name, "ok", detail)


def check_config(path: str) -> tuple[list[Check], Any]:
    """The config validates; its teacher checkpoint (if any) is readable weights-only."""

    try:
        cfg = load_config(path)
    except KdlabError as e:
        return [Check("config valid", "fail", str(e))], None
    checks = [Check("config valid", "ok", path)]
    if cfg.teacher is not None and cfg.teacher.checkpoint:
        name = "teacher checkpoint readable (weights_only)"
        try:
            extract_state_dict(read_checkpoint(cfg.teacher.checkpoint), cfg.teacher.checkpoint)
            checks.append(Check(name, "ok", cfg.teacher.checkpoint))
        except KdlabError as e:
            checks.append(Check(name, "fail", str(e)))
    return checks, cfg


def check_datasets(found: list[dict[str, Any]]) -> Check:
    """At least one real dataset is available (a warning, not a failure: synthetic data works)."""
    names = [d["name"] for d in found if d["path"]]
    if names:
        return Check("datasets found", "ok", ", ".join(names))
    return Check("datasets found", "warn",
                 "none of fashion_mnist, cifar10, cifar100 (put them in $KDLAB_DATA or ./data, "
                 "or let a run fetch them with `--set data.download=true`; Fashion-MNIST: "
                 "`apt-get install dataset-fashion-mnist`)")


def run_doctor(run_dir: str | Path | None = None, config: str | None = None,
               n_checkpoints: int = 4, arch: str | None = None) -> DoctorReport:
    """Collect the environment, datasets and disk, and run the checks that apply.

    Args:
        run_dir: where a run would write (default: the current folder).
        config: an experiment YAML to validate; its student sets the checkpoint size estimate.
        n_checkpoints: how many checkpoints must fit (last, last.prev, the temporary file while
            writing, best).
        arch: the model whose checkpoints must fit (default: the config's student, else the
            largest model of the zoo).
    """
    target = Path(run_dir) if run_dir is not None else Path.cwd()
    found = datasets()
    disk = [disk_free(Path.cwd())]
    if run_dir is not None:
        disk.append(disk_free(target))
    report = DoctorReport(environment=environment(), datasets=found, disk=disk)
    cfg = None
    if config is not None:
        cfg_checks, cfg = check_config(config)
        report.checks += cfg_checks
    if arch is None:
        arch = cfg.student.arch if cfg is not None else LARGEST_MODEL
    report.checks.append(check_writable(target))
    report.checks.append(check_free_disk(target, arch, n_checkpoints))
    report.checks.append(check_datasets(found))
    report.checks.append(Check(
        "GPU", "ok" if report.environment["gpus"] else "warn",
        ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in report.environment["gpus"])
        or "no GPU: runs use the CPU"))
    return report


# --------------------------------------------------------------------------- output
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _rows(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [title, *(f"  {k:<{width}}  {v}" for k, v in rows), ""]


def format_table(report: DoctorReport) -> str:
    """The human-readable report: environment, datasets, disk, then the checks."""
    env = report.environment
    env_rows = [(k, str(env[k])) for k in ("kdlab", "torch", "python", "torch_build", "cpu_bf16",
                                           "cpu_count", "torch_threads", "platform")]
    env_rows.append(("gpus", ", ".join(f"{g['index']}: {g['name']} ({g['memory_gib']} GiB)"
                                       for g in env["gpus"]) or "none"))
    ds_rows = [(d["name"], d["path"] or f"not found (searched {', '.join(d['searched'])})")
               for d in report.datasets]
    disk_rows = [(d["path"], f"{_human(d['free_bytes'])} free of {_human(d['total_bytes'])}")
                 for d in report.disk]
    det_rows = [(k, str(v)) for k, v in env.get("detection", {}).items()]
    lines = _rows("Environment", env_rows) + _rows("Detection", det_rows) + \
        _rows("Datasets", ds_rows) + _rows("Disk", disk_rows)
    width = max((len(c.name) for c in report.checks), default=0)
    lines.append("Checks")
    lines += [f"  {c.status.upper():<4}  {c.name:<{width}}  {c.detail}" for c in report.checks]
    n_fail = sum(c.status == "fail" for c in report.checks)
    n_warn = sum(c.status == "warn" for c in report.checks)
    lines += ["", f"{n_fail} failed, {n_warn} warning(s), "
                  f"{len(report.checks) - n_fail - n_warn} ok"]
    return "\n".join(lines) + "\n"
