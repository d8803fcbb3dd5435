"""Loading model weights safely: CRD/mdistiller teacher files and kdlab checkpoints.

Files are read by :func:`kdlab.core.weights_file.read_verified` (weights only, integrity
checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.core.errors import CheckpointError
from kdlab.core.weights_file import read_checkpoint, read_verified

__all__ = ["extract_state_dict", "load_checkpoint", "load_state_dict_strict", "read_checkpoint"]


def extract_state_dict(obj: dict[str, Any], path: str | Path = "<memory>") -> dict[str, Any]:
    """The model state dict inside a checkpoint dict.

    Accepts the CRD/mdistiller teacher format (``{"model": state_dict, ...}``), kdlab's own
    training checkpoints (``{"student": state_dict, ...}`` / ``{"model": ...}``), and a bare
    state dict. A ``module.`` prefix left by DataParallel/DDP is removed.
    """
    for key in ("model", "state_dict", "student"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no model state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_state_dict_strict(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Load ``state`` into ``model`` requiring identical keys and shapes.

    A mismatch is a :class:`CheckpointError` that names the first missing/unexpected key or the
    first shape difference, which is what a user needs to see when a checkpoint belongs to another
    architecture or class count.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    arch = getattr(model, "arch", type(model).__name__)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise CheckpointError(
            f"checkpoint {source} does not fit model {arch}: {'; '.join(detail)}; "
            "is it for another architecture?"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            hint = ""
            if k.endswith(("weight", "bias")) and k.split(".")[0] in {"classifier", "fc", "linear"}:
                hint = f" (class count: checkpoint {state[k].shape[0]}, model {v.shape[0]})"
            raise CheckpointError(
                f"checkpoint {source} does not fit model {arch}: {k} has shape "
                f"{tuple(state[k].shape)}, model expects {tuple(v.shape)}{hint}"
            )
    model.load_state_dict(state, strict=True)


def load_checkpoint(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load weights from ``path`` into ``model`` (weights-only, strict); returns the file's dict.

    Works for the published CRD teacher checkpoints (state dict under ``"model"``) and for kdlab
    checkpoints. Raises :class:`CheckpointError` naming the mismatch for a wrong architecture or
    class count.
    """
    obj = read_verified(path)
    load_state_dict_strict(model, extract_state_dict(obj, path), str(path))
    return obj
