"""Wrap any torchvision/timm-style classifier as a :class:`KdModel` with forward hooks.

Architecture contract 1 says every model returns a :class:`ModelOutput` and exposes its linear
head as ``model.classifier``. :func:`adapt` gives that to a model written elsewhere, without
copying or editing its code: forward hooks record the final pre-pooling map (``feature_map``),
the stage outputs (``features``) and the input of the linear head (``embedding``) while the
model runs its own ``forward``, so ``logits`` are exactly what the wrapped model returns.

Presets (chosen from the model's structure; every choice can be overridden by name):

* **timm** (``forward_features``, ``forward_head`` and ``get_classifier``): ``feature_map =
  forward_features(x)``, ``logits = forward_head(feature_map)``, stages from ``feature_info``.
* **ResNet** (torchvision / timm names ``conv1``, ``bn1``, ``layer1``..``layerN``, ``fc``): stem
  (``maxpool``, else ``relu``/``act1``) and ``layer1``..``layerN``; ``feature_map`` is the last
  ``layerN`` output.
* **features/classifier** (torchvision MobileNetV2/V3, EfficientNet, ConvNeXt, RegNet-like):
  ``feature_map`` is the ``features`` output; the stages are the last child of ``features`` at
  each spatial resolution; the head is the last ``nn.Linear`` in ``classifier``. A LayerNorm in
  the head before the linear layer (ConvNeXt: ``LayerNorm2d, Flatten, Linear``; timm's
  ``head.norm``) is part of ``model.classifier``, so SDD's regional logits (Wei et al., CVPR 2024)
  see the same head as the global logits.

``embedding`` is the pooled vector the head receives (the input of the head norm where there is
one, else of the linear layer), so ``classifier(embedding) == logits`` holds exactly; in training
mode a dropout before the linear layer is already applied to ``embedding``.

Neither torchvision nor timm is imported: models are recognised by their attribute names.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdlab.core.errors import ModelError
from kdlab.models.output import KdModel, ModelOutput

__all__ = ["AdaptedModel", "NormLinearHead", "adapt"]


class NormLinearHead(nn.Module):
    """A head ``linear(layer_norm(v))`` callable on ``(..., C)`` (ConvNeXt-style classifiers).

    ``norm`` is any LayerNorm-like module with ``weight``, ``bias``, ``eps`` and
    ``normalized_shape`` (``nn.LayerNorm``, torchvision's/timm's ``LayerNorm2d``); it is applied
    over the last dimension, which is what ``LayerNorm2d`` does to a ``B x C x 1 x 1`` pooled map.
    The modules are referenced, not copied: training the wrapped model trains this head.
    """

    def __init__(self, norm: nn.Module, linear: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.linear = linear
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        shape = tuple(getattr(norm, "normalized_shape", (x.shape[-1],)))
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        eps = float(getattr(norm, "eps", 1e-6))
        return self.linear(F.layer_norm(x, shape, weight, bias, eps))


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise ModelError(f"adapt: the model has no submodule {path!r}") from e


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ModelError("adapt: the classifier returned by get_classifier() is not a submodule")


def _is_layer_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or "LayerNorm" in type(m).__name__


def _last_linear(module: nn.Module, where: str) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"adapt: no nn.Linear head found in {where!r}; pass classifier='<path>'")
    if len(linears) > 1:
        names = ", ".join(n or where for n, _ in linears)
        raise ModelError(
            f"adapt: {where!r} holds several linear layers ({names}), an MLP head; SDD/DCKD need "
            "a single linear head on the pooled map: pass classifier='<path>' and "
            "feature_map='<path>' explicitly"
        )
    return linears[0]


class AdaptedModel(KdModel):
    """A foreign classifier seen through hooks as a :class:`KdModel` (see :func:`adapt`).

    Attributes:
        model: the wrapped module (its state-dict keys appear under ``model.``).
        classifier_path: dotted path of the linear head inside ``model``.
        feature_map_path: dotted path of the module whose output is ``feature_map`` (``None``
            for timm's ``forward_features``).
        feature_paths: dotted paths whose outputs are ``features`` (``None``: chosen per call,
            the last child of ``features`` at each resolution).
        preset: which preset built it (``"timm"``, ``"resnet"``, ``"features"``, ``"explicit"``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        classifier_path: str,
        feature_map_path: str | None,
        feature_paths: list[str] | None,
        head_norm_path: str | None = None,
        preset: str = "explicit",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.model = model
        self.classifier_path = classifier_path
        self.feature_map_path = feature_map_path
        self.feature_paths = feature_paths
        self.head_norm_path = head_norm_path
        self.preset = preset
        self.in_channels = in_channels
        linear = _get(model, classifier_path)
        if not isinstance(linear, nn.Linear):
            raise ModelError(
                f"adapt: classifier {classifier_path!r} is a {type(linear).__name__}, "
                "expected nn.Linear"
            )
        self.num_classes = linear.out_features
        head: nn.Module = linear
        if head_norm_path is not None:
            head = NormLinearHead(_get(model, head_norm_path), linear)
        # Kept outside ``_modules``: no second state-dict entry for the head's parameters.
        object.__setattr__(self, "_head", head)
        self._store: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = []
        self._install_hooks()

    # -- hooks ---------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        store = self._store
        model = self.model

        def keep_input(key: str):  # noqa: ANN202 - hook factory
            def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                store[key] = args[0]

            return hook

        def keep_output(key: str):  # noqa: ANN202 - hook factory
            def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
                store[key] = out

            return hook

        first_head = self.head_norm_path or self.classifier_path
        self._handles.append(
            _get(model, first_head).register_forward_pre_hook(keep_input("embedding"))
        )
        self._handles.append(
            _get(model, self.classifier_path).register_forward_hook(keep_output("head_out"))
        )
        if self.feature_map_path is not None:
            self._handles.append(
                _get(model, self.feature_map_path).register_forward_hook(keep_output("fmap"))
            )
        if self.feature_paths is not None:
            for i, path in enumerate(self.feature_paths):
                self._handles.append(_get(model, path).register_forward_hook(keep_output(f"f{i}")))
        elif self.preset == "features":
            children = list(_get(model, "features").children())
            for i, child in enumerate(children):
                self._handles.append(child.register_forward_hook(keep_output(f"c{i}")))
            self._store["n_children"] = len(children)

    def remove_hooks(self) -> None:
        """Detach every hook from the wrapped model (the wrapper is unusable afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def classifier(self) -> nn.Module:  # type: ignore[override]
        """The head callable on ``(..., C)``: the linear layer, or norm + linear."""
        return self.__dict__["_head"]

    # -- forward -------------------------------------------------------------------------
    def _stage_outputs(self) -> list[Tensor]:
        store = self._store
        if self.feature_paths is not None:
            return [store.pop(f"f{i}") for i in range(len(self.feature_paths))]
        if self.preset != "features":
            return []
        outs = [store.pop(f"c{i}", None) for i in range(store["n_children"])]
        outs = [o for o in outs if isinstance(o, Tensor) and o.dim() == 4]
        return [
            o
            for i, o in enumerate(outs)
            if i + 1 == len(outs) or outs[i + 1].shape[-2:] != o.shape[-2:]
        ]

    def forward(self, x: Tensor) -> ModelOutput:
        store = self._store
        for k in [k for k in store if k != "n_children"]:
            del store[k]
        try:
            if self.preset == "timm":
                fmap = self.model.forward_features(x)  # type: ignore[operator]
                result = self.model.forward_head(fmap)  # type: ignore[operator]
            else:
                result = self.model(x)
                fmap = store.get("fmap")
            embedding = store["embedding"]
            head_out = store["head_out"]
            features = self._stage_outputs()
        finally:
            for k in [k for k in store if k != "n_children"]:
                del store[k]
        if not isinstance(fmap, Tensor) or fmap.dim() != 4:
            shape = tuple(fmap.shape) if isinstance(fmap, Tensor) else type(fmap).__name__
            raise ModelError(
                f"adapt: the feature map must be B x C x H x W, got {shape}; pass "
                "feature_map='<module path>' naming the last convolutional stage"
            )
        logits = result if isinstance(result, Tensor) else head_out
        return ModelOutput(
            logits=logits,
            feature_map=fmap,
            features=features,
            embedding=embedding.flatten(1),
            preact_features=[],
        )


def _resnet_preset(model: nn.Module) -> tuple[str, str, list[str]] | None:
    layers = []
    i = 1
    while isinstance(getattr(model, f"layer{i}", None), nn.Module):
        layers.append(f"layer{i}")
        i += 1
    if not layers or not isinstance(getattr(model, "fc", None), nn.Linear):
        return None
    stem = next((s for s in ("maxpool", "act1", "relu", "bn1") if hasattr(model, s)), None)
    stages = ([stem] if stem is not None else []) + layers
    return "fc", layers[-1], stages


def _head_norm_in(container: nn.Module, container_path: str, linear_name: str) -> str | None:
    """A LayerNorm-like module in the head container (before its linear layer), if any."""
    for name, m in container.named_children():
        if name == linear_name.split(".")[0]:
            break
        if _is_layer_norm(m):
            return f"{container_path}.{name}" if container_path else name
    return None


class _Plan(NamedTuple):
    """What :func:`adapt` hands to :class:`AdaptedModel`: the preset and the module paths."""

    preset: str
    classifier: str | None
    feature_map: str | None
    stages: list[str] | None
    head_norm: str | None


def _is_timm_like(model: nn.Module) -> bool:
    return all(
        callable(getattr(model, a, None))
        for a in ("forward_features", "forward_head", "get_classifier")
    )


def _timm_stages(model: nn.Module) -> list[str] | None:
    """The stage paths named by timm's ``feature_info``, if it names them all."""
    info = getattr(model, "feature_info", None)
    names = [d.get("module") for d in info] if isinstance(info, list) else []
    if names and all(isinstance(n, str) and n for n in names):
        return [str(n) for n in names]
    return None


def _timm_plan(
    model: nn.Module,
    classifier: str | None,
    feature_layers: list[str] | None,
    feature_map: str | None,
    head_norm: str | None,
) -> _Plan:
    """The timm preset: head from ``get_classifier()``, stages from ``feature_info``, a
    ``norm`` next to the head; ``forward_features`` gives the map unless a path is forced."""
    cls_path, stages, norm_path = classifier, feature_layers, head_norm
    head = model.get_classifier()  # type: ignore[operator]
    if cls_path is None:
        if not isinstance(head, nn.Linear):
            raise ModelError(
                f"adapt: get_classifier() returned a {type(head).__name__}, expected "
                "nn.Linear (was the model built with num_classes=0?)"
            )
        cls_path = _path_of(model, head)
    if stages is None:
        stages = _timm_stages(model)
    if norm_path is None and "." in cls_path:
        parent_path = cls_path.rsplit(".", 1)[0]
        norm = getattr(_get(model, parent_path), "norm", None)
        if isinstance(norm, nn.Module) and _is_layer_norm(norm):
            norm_path = f"{parent_path}.norm"
    preset = "timm" if feature_map is None else "explicit"
    return _Plan(preset, cls_path, feature_map, stages, norm_path)


def _features_plan(
    model: nn.Module,
    feature_layers: list[str] | None,
    feature_map: str | None,
    head_norm: str | None,
) -> _Plan:
    """The features/classifier preset: the last linear layer of ``classifier`` (and a
    LayerNorm before it), the map from ``features``."""
    preset = "features" if feature_layers is None else "explicit"
    norm_path = head_norm
    container = model.classifier
    if isinstance(container, nn.Linear):
        cls_path = "classifier"
    else:
        name, _ = _last_linear(container, "classifier")
        cls_path = f"classifier.{name}"
        if norm_path is None:
            norm_path = _head_norm_in(container, "classifier", name)
    return _Plan(preset, cls_path, feature_map or "features", feature_layers, norm_path)


def _plan(
    model: nn.Module,
    classifier: str | None,
    feature_layers: list[str] | None,
    feature_map: str | None,
    head_norm: str | None,
) -> _Plan:
    """The first preset that fits ``model`` (timm, ResNet, features/classifier), else the
    explicit paths as given."""
    if _is_timm_like(model):
        return _timm_plan(model, classifier, feature_layers, feature_map, head_norm)
    if classifier is None and feature_map is None and (rn := _resnet_preset(model)):
        cls_path, fmap_path, default_stages = rn
        stages = default_stages if feature_layers is None else feature_layers
        return _Plan("resnet", cls_path, fmap_path, stages, head_norm)
    if (
        classifier is None
        and isinstance(getattr(model, "features", None), nn.Module)
        and isinstance(getattr(model, "classifier", None), nn.Module)
    ):
        return _features_plan(model, feature_layers, feature_map, head_norm)
    return _Plan("explicit", classifier, feature_map, feature_layers, head_norm)


def adapt(
    model: nn.Module,
    classifier: str | None = None,
    feature_layers: list[str] | None = None,
    *,
    feature_map: str | None = None,
    head_norm: str | None = None,
    in_channels: int = 3,
) -> AdaptedModel:
    """Wrap a torchvision/timm-style classifier so that it returns a :class:`ModelOutput`.

    Args:
        model: the classifier (any ``nn.Module`` mapping images to ``B x K`` logits through one
            global pooling and one linear head).
        classifier: dotted path of the final ``nn.Linear`` (found by the presets if ``None``).
        feature_layers: dotted paths of the modules whose outputs are ``features``
            (``[stem, stage1, ...]``); ``None``: the preset's.
        feature_map: dotted path of the module whose output is the final map before global
            pooling; ``None``: the preset's, else the last of ``feature_layers``.
        head_norm: dotted path of a LayerNorm applied to the pooled vector before the linear
            head (ConvNeXt); ``None``: found in the head container by the presets.
        in_channels: input channels (used by :meth:`KdModel.probe`).

    Returns:
        An :class:`AdaptedModel`; ``out.logits`` is exactly the wrapped model's output,
        ``model.classifier(out.embedding) == out.logits``.

    Raises:
        ModelError: no preset fits and the paths were not given, a path does not exist, or the
            head is not a single linear layer.
    """
    if isinstance(model, KdModel):
        raise ModelError("adapt: the model is already a KdModel")
    preset, cls_path, fmap_path, stages, norm_path = _plan(
        model, classifier, feature_layers, feature_map, head_norm
    )
    if cls_path is None:
        raise ModelError(
            f"adapt: cannot recognise {type(model).__name__} (no timm forward_features/"
            "get_classifier, no ResNet layer1..layerN + fc, no features + classifier): pass "
            "classifier='<linear head path>' and feature_map='<last stage path>'"
        )
    if fmap_path is None and preset != "timm":
        if not stages:
            raise ModelError("adapt: pass feature_map='<path>' (or feature_layers=[...])")
        fmap_path = stages[-1]
    return AdaptedModel(
        model,
        classifier_path=cls_path,
        feature_map_path=fmap_path,
        feature_paths=stages,
        head_norm_path=norm_path,
        preset=preset,
        in_channels=in_channels,
    )
