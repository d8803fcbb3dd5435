"""Small vision transformers for 32-px inputs: vit_tiny, vit_lite_6, vit_lite_7, vit_lite_7_gap,
and their DeiT variants with a distillation token (vit_tiny_distilled, vit_lite_7_distilled).

The sizes are the CIFAR "ViT-Lite" models of Hassani, Walton, Shah, Abuduweili, Li, Shi,
"Escaping the Big Data Paradigm with Compact Transformers" (arXiv:2104.05704, 2021):
ViT-Lite-6/4 and ViT-Lite-7/4 (depth 6 or 7, width 256, 4 heads, MLP ratio 2, 4x4 patches on
32x32 images, a class token and learnable position embeddings). The block is the pre-norm block
of Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), written as timm's
``VisionTransformer`` writes it.

Followed from the paper: depth, width, heads, MLP ratio, patch size 4, the class token, learnable
(not sinusoidal) position embeddings, GELU, pre-norm blocks with a final LayerNorm.

kdlab's choices (not from the paper):

* the tokenizer is a plain patch embedding (a conv with kernel = stride = patch size): CCT's
  convolutional tokenizer and sequence pooling are not used; ``vit_lite_7_gap`` replaces the
  class token by the mean of the normed patch tokens (a kdlab variant, not a paper model);
* ``vit_tiny`` (depth 4, width 128, 4 heads, MLP ratio 2) is a kdlab size for tests and CPU work;
* dropout, attention dropout and drop-path (stochastic depth) default to 0; the paper's training
  recipe (its regularisation included) is not part of the model definition;
* LayerNorm ``eps=1e-6`` and the initialisation are timm's: ``trunc_normal(std=0.02)`` for every
  linear weight, the position embeddings and the class token, zero biases, LayerNorm weight 1 and
  bias 0; the patch conv keeps PyTorch's default initialisation (as timm's default mode does);
* attention is :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels);
* inputs of another side (divisible by the patch size) work: the position embeddings of the
  patch grid are resampled bicubically (with antialiasing, as timm's ``resample_abs_pos_embed``)
  to the input's grid; the class token's embedding is kept.

``ModelOutput`` of a ViT (kdlab's definitions for token models):

* ``feature_map``: the patch tokens after the final LayerNorm, class token removed, as a
  ``B x C x H' x W'`` grid (8x8 at 32 px). SDD's regions are therefore average-pooled token
  regions and SDD's local logits are ``classifier`` on pooled normed patch tokens. For ``gap``
  models ``classifier(feature_map.mean((2, 3)))`` is exactly the logits; for ``cls`` models the
  logits come from the class token, so SDD's region 0 (the whole map) is not the model's logits.
* ``features``: ``[patch embedding grid (the patch conv's output, before position embeddings),
  the output of each block]``, each ``B x C x H' x W'`` with the class token removed
  (``1 + depth`` tensors).
* ``embedding``: the vector the head reads (the normed class token, or the mean of the normed
  patch tokens), so ``logits == classifier(embedding)``.
* ``preact_features``: empty.

The distillation token (Touvron et al., "Training data-efficient image transformers &
distillation through attention", ICML 2021; timm's ``VisionTransformerDistilled``): a second
learnable token after the class token, with its own position embedding, read after the final
norm by a second linear head ``head_dist``. In training mode ``logits`` are the class-token
head's and ``dist_logits`` the distillation head's (the official student returns both); in eval
mode ``logits = (head(cls) + head_dist(dist)) / 2``, DeiT's inference rule, and ``dist_logits`` is
None. ``embedding`` is the normed class token (``logits == classifier(embedding)`` in training
mode only); both prefix tokens are removed from the grids.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.core.errors import ModelError
from kdlab.models.output import KdModel, ModelOutput
from kdlab.models.registry import register_model

__all__ = [
    "Attention",
    "Block",
    "Mlp",
    "PositionEmbedding",
    "VisionTransformer",
    "resample_pos_embed",
    "vit_lite_6",
    "vit_lite_7",
    "vit_lite_7_distilled",
    "vit_lite_7_gap",
    "vit_tiny",
    "vit_tiny_distilled",
]

Pool = Literal["cls", "gap"]
_LN_EPS = 1e-6


def resample_pos_embed(grid_embed: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample ``1 x (h*w) x C`` grid position embeddings (``h = w``, row-major) to ``size``.

    Bicubic interpolation with antialiasing, as timm's ``resample_abs_pos_embed``; the input is
    returned unchanged (the same tensor) when ``size`` is already its grid.
    """
    n, c = int(grid_embed.shape[1]), int(grid_embed.shape[2])
    side = math.isqrt(n)
    if side * side != n:
        raise ModelError(f"position embeddings of {n} tokens are not a square grid")
    size = (int(size[0]), int(size[1]))  # plain ints under TorchScript tracing too
    if (side, side) == size:
        return grid_embed
    grid = grid_embed.reshape(1, side, side, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=size, mode="bicubic", antialias=True,
                         align_corners=False).to(grid_embed.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], c)


class PositionEmbedding(nn.Module):
    """Learnable position embeddings of a ``grid x grid`` patch grid, and the optional class and
    distillation tokens.

    ``forward(tokens, size)`` adds the (resampled, when ``size != (grid, grid)``) embeddings to
    the ``B x N x C`` patch tokens and prepends the class token and then the distillation token
    (each with its own embedding) when they are on: ``B x (prefix + N) x C``. ``pos_embed`` is
    ``1 x (prefix + grid^2) x C`` with the prefix tokens' entries first, as timm stores it.
    """

    def __init__(self, dim: int, grid: int, cls_token: bool, dist_token: bool = False) -> None:
        super().__init__()
        if dist_token and not cls_token:
            raise ModelError("a ViT distillation token needs the class token (pool='cls')")
        self.num_prefix = int(cls_token) + int(dist_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if dist_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + grid * grid, dim))
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        grid_embed = resample_pos_embed(self.pos_embed[:, self.num_prefix:], size)
        x = tokens + grid_embed
        prefix = [t for t in (self.cls_token, self.dist_token) if t is not None]
        if not prefix:
            return x
        embedded = torch.cat(prefix, dim=1) + self.pos_embed[:, :self.num_prefix]
        return torch.cat([embedded.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention ``proj(SDPA(q, k, v))`` with a joint ``qkv`` linear layer.

    ``forward`` maps ``B x N x C`` to ``B x N x C``; the attention is
    ``softmax(q k^T / sqrt(head_dim)) v`` per head, computed by
    :func:`torch.nn.functional.scaled_dot_product_attention`.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ModelError(f"ViT width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` of ``B x N x C`` tokens, each ``B x heads x N x head_dim``."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """``fc2(drop(gelu(fc1(x))))`` followed by dropout: ``... x C -> ... x C``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``drop_path`` is the stochastic-depth rate of both residual branches (training only).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def _check_args(depth: int, dim: int, patch_size: int, img_size: int, pool: str,
                rates: tuple[float, ...]) -> None:
    if pool not in ("cls", "gap"):
        raise ModelError(f"ViT pool must be 'cls' or 'gap', got {pool!r}")
    if depth < 1 or dim < 1 or patch_size < 1:
        raise ModelError(f"ViT depth, width and patch size must be >= 1, got {depth}, {dim}, "
                         f"{patch_size}")
    if img_size % patch_size != 0:
        raise ModelError(f"ViT img_size {img_size} is not divisible by patch_size {patch_size}")
    if any(not 0.0 <= r < 1.0 for r in rates):
        raise ModelError(f"ViT dropout / drop-path rates must be in [0, 1), got {rates}")


def _grid(x: Tensor, h: int, w: int) -> Tensor:
    """``B x (h*w) x C`` tokens as a ``B x C x h x w`` map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class VisionTransformer(KdModel):
    """A ViT classifier returning :class:`ModelOutput` (see the module docstring for its fields).

    Args:
        depth: number of transformer blocks.
        dim: token width ``C``.
        num_heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: MLP hidden width / ``dim``.
        pool: ``"cls"`` (head on the normed class token) or ``"gap"`` (head on the mean of the
            normed patch tokens; no class token).
        patch_size: side of the square patches (kernel and stride of the patch conv).
        img_size: input side the position embeddings are made for (other sides divisible by
            ``patch_size`` are resampled to at run time).
        num_classes, in_channels: head size and input channels.
        drop, attn_drop, drop_path: dropout after the MLP / projections, on the attention weights,
            and the largest stochastic-depth rate (linearly increasing over the blocks, as timm).
        dist_token: add DeiT's distillation token and its head ``head_dist`` (needs
            ``pool="cls"``); see the module docstring for the training/eval logits.

    Raises:
        ModelError: impossible sizes or rates; at run time, an input side not divisible by
            ``patch_size``.
    """

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_ratio: float = 2.0, *,
                 pool: Pool = "cls", patch_size: int = 4, img_size: int = 32,
                 num_classes: int = 100, in_channels: int = 3, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, dist_token: bool = False) -> None:
        super().__init__()
        _check_args(depth, dim, patch_size, img_size, pool, (drop, attn_drop, drop_path))
        self.token_grid = True
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.pool = pool
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.embed = PositionEmbedding(dim, self.grid_size, cls_token=pool == "cls",
                                       dist_token=dist_token)
        self.distillation_token = dist_token
        self.pos_drop = nn.Dropout(drop)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, drop, attn_drop, r) for r in rates
        )
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.classifier = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if dist_token else None
        self.apply(_init_timm)

    def forward(self, x: Tensor) -> ModelOutput:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ModelError(f"ViT input {tuple(x.shape[-2:])} is not divisible by patch {p}")
        patches = self.patch_embed(x)
        h, w = patches.shape[-2:]
        prefix = self.embed.num_prefix
        tokens = self.pos_drop(self.embed(patches.flatten(2).transpose(1, 2), (h, w)))
        features = [patches]
        for block in self.blocks:
            tokens = block(tokens)
            features.append(_grid(tokens[:, prefix:], h, w))
        normed = self.norm(tokens)
        feature_map = _grid(normed[:, prefix:], h, w)
        embedding = normed[:, 0] if self.pool == "cls" else feature_map.mean((2, 3))
        logits, dist_logits = self.classifier(embedding), None
        if self.head_dist is not None:
            dist_logits = self.head_dist(normed[:, 1])
            if not self.training:
                logits, dist_logits = (logits + dist_logits) / 2, None
        return ModelOutput(logits=logits, feature_map=feature_map, features=features,
                           embedding=embedding, preact_features=[], dist_logits=dist_logits)


def _init_timm(m: nn.Module) -> None:
    """timm's ViT init: linear weights ``trunc_normal(std=0.02)``, zero biases, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@register_model("vit_tiny")
def vit_tiny(num_classes: int = 100, in_channels: int = 3) -> VisionTransformer:
    """kdlab's tiny ViT for tests and CPU studies: depth 4, width 128, 4 heads, MLP ratio 2,
    patch 4, class token."""
    return VisionTransformer(4, 128, 4, 2.0, pool="cls", num_classes=num_classes,
                             in_channels=in_channels)


@register_model("vit_lite_6")
def vit_lite_6(num_classes: int = 100, in_channels: int = 3) -> VisionTransformer:
    """ViT-Lite-6/4 (Hassani et al., 2021): depth 6, width 256, 4 heads, MLP ratio 2, patch 4,
    class token."""
    return VisionTransformer(6, 256, 4, 2.0, pool="cls", num_classes=num_classes,
                             in_channels=in_channels)


@register_model("vit_lite_7")
def vit_lite_7(num_classes: int = 100, in_channels: int = 3) -> VisionTransformer:
    """ViT-Lite-7/4 (Hassani et al., 2021): depth 7, width 256, 4 heads, MLP ratio 2, patch 4,
    class token."""
    return VisionTransformer(7, 256, 4, 2.0, pool="cls", num_classes=num_classes,
                             in_channels=in_channels)


@register_model("vit_lite_7_gap")
def vit_lite_7_gap(num_classes: int = 100, in_channels: int = 3) -> VisionTransformer:
    """ViT-Lite-7/4 sizes with global average pooling of the normed patch tokens instead of the
    class token (a kdlab variant)."""
    return VisionTransformer(7, 256, 4, 2.0, pool="gap", num_classes=num_classes,
                             in_channels=in_channels)


@register_model("vit_tiny_distilled")
def vit_tiny_distilled(num_classes: int = 100, in_channels: int = 3) -> VisionTransformer:
    """``vit_tiny`` with DeiT's distillation token and head (Touvron et al., ICML 2021); eval-mode
    logits average the two heads."""
    return VisionTransformer(4, 128, 4, 2.0, pool="cls", num_classes=num_classes,
                             in_channels=in_channels, dist_token=True)


@register_model("vit_lite_7_distilled")
def vit_lite_7_distilled(num_classes: int = 100, in_channels: int = 3) -> VisionTransformer:
    """ViT-Lite-7/4 with DeiT's distillation token and head (Touvron et al., ICML 2021; a kdlab
    combination); eval-mode logits average the two heads."""
    return VisionTransformer(7, 256, 4, 2.0, pool="cls", num_classes=num_classes,
                             in_channels=in_channels, dist_token=True)
