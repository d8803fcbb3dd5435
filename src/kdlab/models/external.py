"""Classifiers of torchvision and timm by name: ``arch: "torchvision:resnet18"``, ``"timm:NAME"``.

:func:`create_external` builds the library's model with the run's class count
(``torchvision.models.get_model(name, weights=None, num_classes=K)``,
``timm.create_model(name, pretrained=False, num_classes=K, in_chans=C)``) and wraps it with
:func:`kdlab.models.adapter.adapt`, so that it returns a :class:`~kdlab.models.ModelOutput` and
every method (SDD's regional logits, FitNet's hints, ...) works on it. ``create_model`` resolves
such names here; the zoo registry is not involved. The arch string is recorded in the run's
config and checkpoints, so ``kdlab eval``, ``--resume`` and ``kdlab.load_student`` rebuild the
same network.

:func:`load_pretrained` (``pretrained: true`` in the model's config) loads the library's
published weights: torchvision's default weights through ``torch.hub`` (cached in
``TORCH_HOME/hub/checkpoints``), timm's through its own loader (Hugging Face hub cache). When
the class count differs from the weights' (1000 for ImageNet), the head is new (randomly
initialised), as timm does. Fetching needs the network the first time; without it the error
says which file to put where.

torchvision and timm stay optional: they are imported only when such an arch is used, and a
missing (or unimportable) package is a one-line :class:`~kdlab.core.errors.ModelError`. Neither
is a kdlab requirement: pip would resolve torch again through them (a CUDA build from PyPI).
Install torch, then the torchvision build made for it, then ``pip install --no-deps timm==X``;
the ``vit`` extra holds timm's other runtime dependencies (huggingface_hub, safetensors, PyYAML).
timm imports torchvision: where torchvision's compiled operators do not load with this torch,
a ``timm:`` arch fails with the message that names the torchvision build to install.

timm's ViT / DeiT (distilled too) / Swin / ConvNeXt follow kdlab's token-model conventions
through :func:`~kdlab.models.adapter.adapt` (docs/models.md, "timm transformers and ConvNeXt").
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kdlab.core.errors import ModelError
from kdlab.core.registries import EXTERNAL_MODEL_LIBRARIES, split_external
from kdlab.core.registry import unknown_name_message
from kdlab.core.torchvision_shim import import_torchvision
from kdlab.models.adapter import AdaptedModel, adapt

log = logging.getLogger(__name__)

__all__ = ["LIBRARIES", "create_external", "load_pretrained", "split_external"]

#: the libraries an arch may name as ``LIBRARY:MODEL``.
LIBRARIES = EXTERNAL_MODEL_LIBRARIES


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _import(library: str, arch: str) -> ModuleType:
    """``torchvision.models`` or ``timm``, or a one-line ModelError saying how to install it.

    torchvision is imported plainly (:func:`~kdlab.core.torchvision_shim.import_torchvision`):
    where its compiled operators do not load with this torch, the error names the build to
    install; kdlab's detection shim is never installed for a classifier (a process where a
    detector already installed it uses that torchvision)."""
    module = "torchvision.models" if library == "torchvision" else library
    try:
        if library == "torchvision":
            import_torchvision()  # plainly: a classifier never installs kdlab's detection shim
        return importlib.import_module(module)
    except ModelError as e:  # torchvision's compiled ops do not load: it names the wheel to use
        raise ModelError(f"arch {arch!r}: {e}") from None
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == library:
            raise ModelError(f"arch {arch!r} needs the {library} package: pip install {library} "
                             f"(the build that matches your torch {torch.__version__})") from e
        raise ModelError(f"arch {arch!r}: {library} cannot be imported ({_first_line(e)})") from e
    except Exception as e:  # a build compiled for another torch fails in many ways
        if library == "timm" and "torchvision::" in str(e):
            _raise_torchvision_error(arch, e)
        raise ModelError(f"arch {arch!r}: {library} is installed but cannot be imported "
                         f"({_first_line(e)}); install the {library} build that matches your "
                         f"torch {torch.__version__}") from e


def _raise_torchvision_error(arch: str, error: BaseException) -> None:
    """timm failed to import because torchvision's compiled operators do not load: raise the
    one-line error of :func:`~kdlab.core.torchvision_shim.import_torchvision` (it names the
    torchvision build to install); timm never installs kdlab's detection shim."""
    try:
        import_torchvision()
    except ModelError as tv:
        raise ModelError(f"arch {arch!r}: timm imports torchvision, and {tv}") from error
    except ImportError:
        pass
    raise ModelError(f"arch {arch!r}: timm cannot import torchvision ({_first_line(error)}); "
                     f"install the torchvision build made for your torch {torch.__version__}"
                     ) from error


def _build(library: str, name: str, arch: str, num_classes: int, in_channels: int
           ) -> nn.Module:
    lib = _import(library, arch)
    if library == "torchvision":
        known = list(lib.list_models(module=lib))
        if name not in known:
            raise ModelError(unknown_name_message("torchvision classifier", name, known))
        if in_channels != 3:
            raise ModelError(f"arch {arch!r}: torchvision classifiers take 3-channel images, the "
                             f"data has {in_channels}; use timm:{name} (it adapts in_chans)")
        build = lambda: lib.get_model(name, weights=None, num_classes=num_classes)  # noqa: E731
    else:
        if not lib.is_model(name):
            raise ModelError(unknown_name_message("timm model", name, lib.list_models()))
        build = lambda: lib.create_model(name, pretrained=False,  # noqa: E731
                                         num_classes=num_classes, in_chans=in_channels)
    try:
        model = build()
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ModelError(f"arch {arch!r}: {library} cannot build it with {num_classes} "
                         f"classes and {in_channels} input channels ({_first_line(e)})") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"arch {arch!r}: {library} returned a {type(model).__name__}, not a "
                         "torch module")
    return model


def create_external(arch: str, num_classes: int, in_channels: int) -> AdaptedModel:
    """The classifier ``arch`` (``torchvision:NAME`` or ``timm:NAME``) with ``num_classes``
    outputs, randomly initialised by its library, wrapped by :func:`adapt`.

    Raises:
        ModelError: the package is missing or unimportable, the name is unknown (with
            suggestions), or the model is not a single-head classifier :func:`adapt` recognises.
    """
    found = split_external(arch)
    if found is None:
        raise ModelError(f"arch {arch!r} is not LIBRARY:NAME with LIBRARY one of "
                         f"{', '.join(LIBRARIES)}")
    library, name = found
    model = _build(library, name, arch, num_classes, in_channels)
    try:
        return adapt(model, in_channels=in_channels)
    except ModelError as e:
        raise ModelError(f"arch {arch!r} cannot be wrapped as a kdlab model ({e}); to choose "
                         "its layers yourself, register adapt(model, classifier=..., "
                         "feature_map=...) as a model in a plugin (docs/extending.md)") from e


def load_pretrained(model: nn.Module) -> None:
    """Load the published weights of ``model``'s library into it (``pretrained: true``).

    ``model`` is what :func:`kdlab.models.create_model` built for a ``torchvision:``/``timm:``
    arch. Every weight is loaded except a head whose class count differs (kept as initialised).

    Raises:
        ModelError: not such a model, no published weights, or they cannot be fetched (the
            message says where to put the file without network).
    """
    arch = str(getattr(model, "arch", ""))
    found = split_external(arch)
    if found is None or not isinstance(model, AdaptedModel):
        raise ModelError(f"pretrained weights exist only for torchvision:/timm: archs, not "
                         f"{arch or type(model).__name__!r}")
    library, name = found
    lib = _import(library, arch)
    if library == "torchvision":
        _load_torchvision(lib, name, arch, model)
    else:
        _load_timm(lib, arch, model)


def _load_torchvision(lib: ModuleType, name: str, arch: str, model: AdaptedModel) -> None:
    try:
        weights = lib.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError) as e:
        raise ModelError(f"arch {arch!r}: torchvision publishes no weights for it") from e
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as e:  # URLError offline, a torn download, ...
        url = str(getattr(weights, "url", ""))
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise ModelError(f"cannot get the pretrained weights of {arch} ({_first_line(e)}); "
                         f"without network, put {url.rsplit('/', 1)[-1]} (from {url}) into "
                         f"{folder}") from e
    _load_backbone(model, state, arch)


def _load_backbone(model: AdaptedModel, state: dict[str, Any], arch: str) -> None:
    """Load ``state`` into the wrapped model, keeping the head when its shape differs."""
    own = model.model.state_dict()
    head = f"{model.classifier_path}."
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    left = [k for k in own if k not in fits and not k.startswith(head)]
    if left:
        raise ModelError(f"the pretrained weights of {arch} do not fit the model ({len(left)} "
                         f"tensors missing or of another shape, first: {left[0]})")
    if len(fits) < len(own):
        log.info("%s: pretrained weights loaded, new %d-class head", arch, model.num_classes)
    model.model.load_state_dict(fits, strict=False)


def _load_timm(lib: ModuleType, arch: str, model: AdaptedModel) -> None:
    try:
        lib.models.load_pretrained(model.model, num_classes=model.num_classes,
                                   in_chans=model.in_channels)
    except Exception as e:  # no network, no huggingface_hub, ...
        cfg = getattr(model.model, "pretrained_cfg", None) or {}
        source = cfg.get("hf_hub_id") or cfg.get("url") or "its weights"
        raise ModelError(f"cannot get the pretrained weights of {arch} ({_first_line(e)}); "
                         f"fetch {source} once with network (timm caches it in the Hugging Face "
                         "cache, HF_HOME), or set the model's checkpoint instead") from e
