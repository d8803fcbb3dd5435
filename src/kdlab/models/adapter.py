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

timm's transformers (within the timm preset; the conventions of :mod:`kdlab.models.vit`, and
``token_grid`` is True on the wrapper):

* **ViT / DeiT** (``patch_embed``, ``blocks`` and an integer ``num_prefix_tokens``):
  ``forward_features`` returns ``B x (P + N) x C`` tokens; ``feature_map`` is that output (after
  timm's final ``norm``) without the ``P`` prefix tokens (class, distillation, register), as a
  ``B x C x H' x W'`` grid (``H' x W'`` the patch grid of this input); ``features`` are the
  ``patch_embed`` output, then every block's output, as grids. A ``fc_norm`` (timm's
  ``global_pool="avg"`` models, whose ``norm`` is then an identity) is part of
  ``model.classifier``, so ``classifier(feature_map.mean((2, 3)))`` are the logits there; for
  class-token heads ``embedding`` is the normed class token and the pooled map is not the logits.
* **Distilled DeiT** (``get_classifier()`` returns ``(head, head_dist)`` and the model has
  ``set_distilled_training``): the wrapper calls ``set_distilled_training(True)``. In training
  mode ``logits`` are the class-token head's and ``dist_logits`` the distillation head's (timm's
  pair); in eval mode ``logits`` are timm's mean of both heads and ``dist_logits`` is None.
  ``classifier`` is the class-token head, ``embedding`` the normed class token, so
  ``classifier(embedding) == logits`` in training mode only. ``distillation_token`` is True.
* **Swin** (``output_fmt == "NHWC"``): ``feature_map`` and the ``feature_info`` stages are timm's
  channels-last maps permuted to ``B x C x H x W``.

Neither torchvision nor timm is imported: models are recognised by their attribute names.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdlab.core.errors import ModelError
from kdlab.models.output import KdModel, ModelOutput

__all__ = ["AdaptedModel", "NormLinearHead", "adapt"]


class NormLinearHead(nn.Module):
    """A head ``linear(norm(v))`` callable on ``(..., C)`` (ConvNeXt heads, timm's ``fc_norm``).

    A channels-first ``LayerNorm2d`` (torchvision's/timm's; any norm whose class name ends in
    ``2d``, with ``weight``, ``bias``, ``eps`` and ``normalized_shape``) is applied as a layer
    norm over the last dimension, which is what it does to a ``B x C x 1 x 1`` pooled map. Any
    other norm (``nn.LayerNorm``, timm's ``LayerNorm``/``RmsNorm`` as ``fc_norm``) already
    normalises the last dimension and is called as it is. The modules are referenced, not
    copied: training the wrapped model trains this head.
    """

    def __init__(self, norm: nn.Module, linear: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.linear = linear
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.channels_first_norm = type(norm).__name__.lower().endswith("2d")

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        if not self.channels_first_norm:
            return self.linear(norm(x))
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


#: How :class:`AdaptedModel` reads the wrapped model's maps: ``"nchw"`` as they are, ``"tokens"``
#: (timm's ViT family) prefix tokens removed and the rest laid out on the patch grid, ``"nhwc"``
#: (timm's Swin) channels-last maps permuted to channels-first.
Layout = Literal["nchw", "tokens", "nhwc"]


def _make_head(model: nn.Module, classifier_path: str, head_norm_path: str | None) -> nn.Module:
    """The ``classifier`` of the wrapper: the linear layer, or norm + linear."""
    linear = _get(model, classifier_path)
    if not isinstance(linear, nn.Linear):
        raise ModelError(
            f"adapt: classifier {classifier_path!r} is a {type(linear).__name__}, "
            "expected nn.Linear"
        )
    if head_norm_path is None:
        return linear
    return NormLinearHead(_get(model, head_norm_path), linear)


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
        layout: how maps are read (:data:`Layout`); ``token_grid`` is True for ``"tokens"`` and
            for ``"nhwc"`` models with a ``patch_embed`` (Swin).
        dist_classifier_path: dotted path of a DeiT distillation head (``head_dist``), else
            ``None``; with one, ``distillation_token`` is True, the wrapped model's
            ``set_distilled_training(True)`` is called, and in training mode ``logits`` are the
            class-token head's and ``dist_logits`` the distillation head's.
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
        layout: Layout = "nchw",
        dist_classifier_path: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.classifier_path = classifier_path
        self.feature_map_path = feature_map_path
        self.feature_paths = feature_paths
        self.head_norm_path = head_norm_path
        self.preset = preset
        self.in_channels = in_channels
        self.layout: Layout = layout
        self.dist_classifier_path = dist_classifier_path
        head = _make_head(model, classifier_path, head_norm_path)
        self.num_classes = _get(model, classifier_path).out_features
        self.token_grid = layout == "tokens" or (
            layout == "nhwc" and isinstance(getattr(model, "patch_embed", None), nn.Module)
        )
        self.distillation_token = dist_classifier_path is not None
        if dist_classifier_path is not None:
            _get(model, dist_classifier_path)
            model.set_distilled_training(True)  # type: ignore[operator]
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
        hooks = [(first_head, True, "embedding"), (self.classifier_path, False, "head_out")]
        if self.feature_map_path is not None:
            hooks.append((self.feature_map_path, False, "fmap"))
        if self.layout == "tokens":  # its output gives the patch grid of each input
            hooks.append(("patch_embed", False, "patches"))
        for i, path in enumerate(self.feature_paths or []):
            hooks.append((path, False, f"f{i}"))
        for path, pre, key in hooks:
            module = _get(model, path)
            self._handles.append(
                module.register_forward_pre_hook(keep_input(key))
                if pre
                else module.register_forward_hook(keep_output(key))
            )
        if self.feature_paths is None and self.preset == "features":
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

    def _clear(self) -> None:
        for k in [k for k in self._store if k != "n_children"]:
            del self._store[k]

    def _run(self, x: Tensor) -> tuple[Any, Any]:
        """The wrapped model's own output and its final map (before any layout change)."""
        if self.preset == "timm":
            fmap = self.model.forward_features(x)  # type: ignore[operator]
            return self.model.forward_head(fmap), fmap  # type: ignore[operator]
        return self.model(x), self._store.get("fmap")

    def _patch_grid(self, x: Tensor) -> tuple[int, int] | None:
        """``(H', W')``, the patch grid of ``x`` for a token model (else None)."""
        if self.layout != "tokens":
            return None
        patches = self._store.get("patches")
        if isinstance(patches, Tensor) and patches.dim() == 4:  # timm's dynamic_img_size: NHWC
            return int(patches.shape[1]), int(patches.shape[2])
        embed = self.model.patch_embed
        size = getattr(embed, "dynamic_feat_size", None)
        h, w = size((int(x.shape[-2]), int(x.shape[-1]))) if callable(size) else embed.grid_size
        return int(h), int(w)

    def _to_grid(self, t: Any, grid: tuple[int, int] | None) -> Any:
        """``t`` as ``B x C x H x W``: channels-last maps (every 4-d map of ``"nhwc"``, a token
        model's ``H' x W' x C`` on ``grid``) permuted, token sequences without their prefix
        tokens laid out on ``grid``; anything else (and every ``"nchw"`` map) as it is."""
        if self.layout == "nchw" or not isinstance(t, Tensor):
            return t
        if t.dim() == 4:  # channels last: Swin's maps, a dynamic ViT's NHWC patch embedding
            nhwc = self.layout == "nhwc" or tuple(t.shape[1:3]) == grid
            return t.permute(0, 3, 1, 2) if nhwc else t
        if t.dim() != 3 or grid is None:
            return t
        h, w = grid
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        extra = t.shape[1] - h * w
        if extra not in (0, prefix):
            raise ModelError(
                f"adapt: {t.shape[1]} tokens do not fit the {h}x{w} patch grid plus {prefix} "
                "prefix tokens; build the model with patch_drop_rate=0 (no token dropping)"
            )
        return t[:, extra:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def _logits(self, result: Any, head_out: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(logits, dist_logits)``: timm's ``(cls, dist)`` pair of a distilled DeiT in
        training mode is split; any other non-tensor output gives the linear head's output."""
        if isinstance(result, Tensor):
            return result, None
        if self.dist_classifier_path is not None and isinstance(result, (tuple, list)):
            return result[0], result[1]
        return head_out, None

    def forward(self, x: Tensor) -> ModelOutput:
        store = self._store
        self._clear()
        try:
            result, fmap = self._run(x)
            embedding = store["embedding"]
            head_out = store["head_out"]
            features = self._stage_outputs()
            grid = self._patch_grid(x)
        finally:
            self._clear()
        fmap = self._to_grid(fmap, grid)
        if not isinstance(fmap, Tensor) or fmap.dim() != 4:
            shape = tuple(fmap.shape) if isinstance(fmap, Tensor) else type(fmap).__name__
            raise ModelError(
                f"adapt: the feature map must be B x C x H x W, got {shape}; pass "
                "feature_map='<module path>' naming the last convolutional stage"
            )
        logits, dist_logits = self._logits(result, head_out)
        return ModelOutput(
            logits=logits,
            feature_map=fmap,
            features=[self._to_grid(f, grid) for f in features],
            embedding=embedding.flatten(1),
            preact_features=[],
            dist_logits=dist_logits,
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
    layout: Layout = "nchw"
    dist_head: str | None = None


def _is_timm_like(model: nn.Module) -> bool:
    return all(
        callable(getattr(model, a, None))
        for a in ("forward_features", "forward_head", "get_classifier")
    )


def _timm_layout(model: nn.Module) -> Layout:
    """``"nhwc"`` for timm's channels-last models (``output_fmt``: Swin), ``"tokens"`` for its
    ViT family (``patch_embed``, ``blocks`` and an integer ``num_prefix_tokens``), else
    ``"nchw"``."""
    if getattr(model, "output_fmt", None) == "NHWC":
        return "nhwc"
    if isinstance(getattr(model, "num_prefix_tokens", None), int) and all(
        isinstance(getattr(model, a, None), nn.Module) for a in ("patch_embed", "blocks")
    ):
        return "tokens"
    return "nchw"


def _timm_stages(model: nn.Module, layout: Layout) -> list[str] | None:
    """The stage paths named by timm's ``feature_info``, if it names them all; a token model's
    start with ``patch_embed`` and default to every block."""
    info = getattr(model, "feature_info", None)
    names = [d.get("module") for d in info] if isinstance(info, list) else []
    named = bool(names) and all(isinstance(n, str) and n for n in names)
    stages = [str(n) for n in names] if named else None
    if layout != "tokens":
        return stages
    if stages is None:
        stages = [f"blocks.{i}" for i in range(len(list(model.blocks.children())))]
    return ["patch_embed", *stages]


def _timm_heads(model: nn.Module, classifier: str | None) -> tuple[str, str | None]:
    """The path of ``get_classifier()``'s linear head (unless given) and of a DeiT distillation
    head (``get_classifier()`` returning ``(head, head_dist)`` on a model with
    ``set_distilled_training``)."""
    head = model.get_classifier()  # type: ignore[operator]
    dist_path = None
    if isinstance(head, tuple) and len(head) == 2 and callable(
        getattr(model, "set_distilled_training", None)
    ):
        head, dist = head
        if not isinstance(dist, nn.Linear):
            raise ModelError(
                f"adapt: the distillation head is a {type(dist).__name__}, expected nn.Linear "
                "(was the model built with num_classes=0?)"
            )
        dist_path = _path_of(model, dist)
    if classifier is not None:
        return classifier, dist_path
    if not isinstance(head, nn.Linear):
        raise ModelError(
            f"adapt: get_classifier() returned a {type(head).__name__}, expected "
            "nn.Linear (was the model built with num_classes=0?)"
        )
    return _path_of(model, head), dist_path


def _timm_head_norm(model: nn.Module, cls_path: str, layout: Layout) -> str | None:
    """A token model's ``fc_norm`` (applied to the pooled tokens), else a LayerNorm named
    ``norm`` next to the linear head (ConvNeXt's ``head.norm``), else None."""
    if layout == "tokens":
        fc_norm = getattr(model, "fc_norm", None)
        if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity):
            return "fc_norm"
        return None
    if "." not in cls_path:
        return None
    parent_path = cls_path.rsplit(".", 1)[0]
    norm = getattr(_get(model, parent_path), "norm", None)
    if isinstance(norm, nn.Module) and _is_layer_norm(norm):
        return f"{parent_path}.norm"
    return None


def _timm_plan(
    model: nn.Module,
    classifier: str | None,
    feature_layers: list[str] | None,
    feature_map: str | None,
    head_norm: str | None,
) -> _Plan:
    """The timm preset: head from ``get_classifier()``, stages from ``feature_info``, a head
    norm (``fc_norm``, ``head.norm``); ``forward_features`` gives the map unless a path is
    forced."""
    layout = _timm_layout(model)
    cls_path, dist_path = _timm_heads(model, classifier)
    stages = _timm_stages(model, layout) if feature_layers is None else feature_layers
    norm_path = head_norm if head_norm is not None else _timm_head_norm(model, cls_path, layout)
    preset = "timm" if feature_map is None else "explicit"
    return _Plan(preset, cls_path, feature_map, stages, norm_path, layout, dist_path)


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
        head_norm: dotted path of a norm applied to the pooled vector before the linear
            head (ConvNeXt's ``head.norm``, a timm ViT's ``fc_norm``); ``None``: found by the
            presets.
        in_channels: input channels (used by :meth:`KdModel.probe`).

    Returns:
        An :class:`AdaptedModel`; ``out.logits`` is exactly the wrapped model's output and
        ``model.classifier(out.embedding) == out.logits``, except for a distilled DeiT: in
        training mode ``logits``/``dist_logits`` are its two heads' outputs, in eval mode
        ``logits`` is their mean while ``classifier`` is the class-token head alone.

    Raises:
        ModelError: no preset fits and the paths were not given, a path does not exist, or the
            head is not a single linear layer.
    """
    if isinstance(model, KdModel):
        raise ModelError("adapt: the model is already a KdModel")
    plan = _plan(model, classifier, feature_layers, feature_map, head_norm)
    if plan.classifier is None:
        raise ModelError(
            f"adapt: cannot recognise {type(model).__name__} (no timm forward_features/"
            "get_classifier, no ResNet layer1..layerN + fc, no features + classifier): pass "
            "classifier='<linear head path>' and feature_map='<last stage path>'"
        )
    fmap_path = plan.feature_map
    if fmap_path is None and plan.preset != "timm":
        if not plan.stages:
            raise ModelError("adapt: pass feature_map='<path>' (or feature_layers=[...])")
        fmap_path = plan.stages[-1]
    return AdaptedModel(
        model,
        classifier_path=plan.classifier,
        feature_map_path=fmap_path,
        feature_paths=plan.stages,
        head_norm_path=plan.head_norm,
        preset=plan.preset,
        layout=plan.layout,
        dist_classifier_path=plan.dist_head,
        in_channels=in_channels,
    )
