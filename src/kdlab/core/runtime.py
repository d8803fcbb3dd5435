"""Device, precision, threads and seeding: the knobs that change speed, not the mathematics."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from kdlab.core.env import cpu_supports_bf16
from kdlab.core.errors import ConfigError

__all__ = [
    "autocast", "configure_determinism", "configure_threads", "process_state_preserved",
    "resolve_amp", "resolve_device",
    "rng_state", "seed_everything", "set_rng_state",
]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"config key 'runtime.device': unknown device {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'runtime.device': CUDA requested but no GPU is available")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``runtime.amp`` on ``device`` (None: full fp32)."""
    if amp == "off":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                "config key 'runtime.amp': fp16 autocast needs a GPU; use bf16 or off")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (None: leave torch's default, one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels (bit-reproducible runs) when asked."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def process_state_preserved() -> Iterator[None]:
    """Restore, after the block, the process-wide settings a run changes: torch's intra-op
    threads, deterministic algorithms (and their warn-only flag), ``cudnn.benchmark`` and every
    global RNG (Python, NumPy, torch, CUDA). A library user's program finds them as it left
    them after :func:`kdlab.run` (the run itself seeds and configures them for its own use)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    rng = rng_state()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        set_rng_state(rng)


def rng_state() -> dict[str, object]:
    """All global RNG states (for exact resume)."""
    state: dict[str, object] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, object]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached), "kind": str(kind)}


def set_rng_state(state: dict[str, object]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    py = list(state["python"])  # type: ignore[call-overload]
    gauss = py.pop()
    random.setstate((state["python_version"], tuple(int(x) for x in py), gauss or None))
    npst = state["numpy"]
    assert isinstance(npst, dict)
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]
