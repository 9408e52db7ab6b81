"""EVA-CLIP's image towers (Sun et al. 2023; BAAI's EVA01-g and EVA02-B/L/E as open_clip builds them from timm):
a ViT with a biased patch embedding, class token and learned positions, attention whose key has no bias, and one of
three block kinds:

- EVA01: pre-LN blocks, fused QKV, GELU MLP;
- EVA02 (B, L): pre-LN blocks, separate Q/K/V projections, 2-D rotary position embeddings on the patch tokens
  (positions rescaled to the 16 x 16 grid the model was pretrained on), a LayerNorm inside the attention output and
  inside a SwiGLU MLP;
- EVA02-E: post-LN blocks (each residual branch normalised after it), fused QKV, GELU MLP.

The class token after a final LayerNorm, then a linear head (with a bias) to the embedding. Meta's Perception Encoder
(PE-Core, Bolya et al. 2025) is the same timm class with other settings: a LayerNorm before the blocks (and no patch
bias), a biased key, rotary positions counted from 1 in (x, y) order, and attention pooling by a learned latent in
place of the class token (which PE-Core-bigG does not have). timm's plain ``VisionTransformer`` is one more setting
of it (a biased QKV product, GELU): MobileCLIP-B's, whose patches come from a three-convolution stem (``stem="mci"``)
and whose class token has no position, and MobileCLIP2-L-14's CLIP-style ViT. ViTamin (Chen et al. 2024) is one more:
its tokens come from a convolutional backbone (a stem and two stages of inverted-bottleneck blocks with LayerNorm, then
a strided convolution: ``stem="vitamin"``), its MLPs are GeGLU with a LayerNorm first, its tokens are averaged (no
class token) and normalised, and open_clip adds an unbiased linear projection outside the trunk (``proj="linear"``).
Module names are timm's, under ``trunk`` as open_clip's ``TimmModel`` keeps them, so open_clip's checkpoints load
without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .convnext import LayerNorm2d
from .inputs import check_image_batch
from .intermediates import spatial_intermediates, take_indices
from .layers import LayerNorm, recomputed
from .locking import VIT_GROUPS, trunk_groups


def rope_table(grid: int, head_dim: int, reference_grid: int, offset: float = 0.0, indexing: str = "ij",
               temperature: float = 10000.0) -> torch.Tensor:
    """timm's ``RotaryEmbeddingCat`` for a square grid: [grid*grid, 2*head_dim], sines then cosines, each angle
    repeated for the pair of channels it rotates. A quarter of the head's channels per axis: row angles first, then
    column angles ("ij"; column first for "xy", PE's); positions start at ``offset`` and are scaled so the grid spans
    ``reference_grid`` (EVA02 fine-tuned at 336 pixels keeps its 224-pixel frequencies)."""
    bands = head_dim // 4
    frequencies = 1.0 / temperature ** (torch.arange(bands, dtype=torch.float32) / bands)
    positions = (torch.arange(grid, dtype=torch.float32) + offset) / grid * reference_grid
    coords = torch.stack(torch.meshgrid(positions, positions, indexing=indexing), dim=-1)  # [grid, grid, 2]
    angles = (coords.unsqueeze(-1) * frequencies).flatten(-2).flatten(0, 1)  # [grid*grid, 2 * bands]
    return torch.cat([angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair of ``x`` [..., L, head_dim] by the table's angles (timm's interleaved
    layout): x * cos + (-x1, x0, -x3, x2, ...) * sin."""
    sin, cos = table.chunk(2, dim=-1)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return (x * cos + rotated * sin).to(x.dtype)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, written over ``x`` where no gradient needs its input (inference): a fresh output as large as the map
    costs about as much on CPU as the GELU itself (ViTamin's 4x-expanded convolution maps; docs/BENCHMARKS.md)."""
    return F.gelu(x) if x.requires_grad else torch.ops.aten.gelu_(x)


class EvaAttention(nn.Module):
    def __init__(self, width: int, heads: int, fused_qkv: bool, inner_norm: bool, eps: float, key_bias: bool = False,
                 prefix_tokens: int = 1):
        """``key_bias``: a plain biased QKV product (PE's; fused only); EVA fixes the key's bias at zero.
        ``prefix_tokens``: tokens before the patches (the class token), which rotary positions leave alone."""
        super().__init__()
        self.heads, self.prefix_tokens = heads, prefix_tokens
        self.q_bias = self.v_bias = None
        if fused_qkv and key_bias:
            self.qkv = nn.Linear(width, 3 * width)
        elif fused_qkv:  # one product; the key's bias is fixed at zero
            self.qkv = nn.Linear(width, 3 * width, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(width))
            self.v_bias = nn.Parameter(torch.zeros(width))
        else:
            self.qkv = None
            self.q_proj = nn.Linear(width, width)
            self.k_proj = nn.Linear(width, width, bias=False)
            self.v_proj = nn.Linear(width, width)
        self.norm = LayerNorm(width, eps=eps) if inner_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        if self.qkv is not None:
            bias = self.qkv.bias if self.q_bias is None else \
                torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            qkv = F.linear(x, self.qkv.weight, bias).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = (proj(x).view(batch, length, self.heads, -1).transpose(1, 2)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None and self.prefix_tokens:  # patch tokens only: the class token has no position
            n = self.prefix_tokens
            q = torch.cat([q[:, :, :n], apply_rope(q[:, :, n:], rope)], dim=2)
            k = torch.cat([k[:, :, :n], apply_rope(k[:, :, n:], rope)], dim=2)
        elif rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        return self.proj(self.norm(out))


class SwiGLU(nn.Module):
    """timm's SwiGLU with split gate and value projections, and EVA02's LayerNorm before the output projection."""

    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.fc1_g = nn.Linear(width, hidden)
        self.fc1_x = nn.Linear(width, hidden)
        self.norm = LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class GeGluMlp(nn.Module):
    """ViTamin's MLP: a LayerNorm first, then ``w2(GELU(w0 x) * w1 x)``."""

    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.norm = LayerNorm(width, eps=eps)
        self.w0 = nn.Linear(width, hidden)
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        hidden, value = _gelu(self.w0(x)), self.w1(x)
        return self.w2(hidden * value if hidden.requires_grad else hidden.mul_(value))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_gelu(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, mlp: str, fused_qkv: bool, inner_norm: bool,
                 post_norm: bool, eps: float, key_bias: bool = False, prefix_tokens: int = 1):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = LayerNorm(width, eps=eps)
        self.attn = EvaAttention(width, heads, fused_qkv, inner_norm, eps, key_bias, prefix_tokens)
        self.norm2 = LayerNorm(width, eps=eps)
        self.mlp = SwiGLU(width, hidden, eps) if mlp == "swiglu" else GeGluMlp(width, hidden, eps) \
            if mlp == "geglu" else Mlp(width, hidden)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:  # EVA02-E: each branch's output normalised before it joins the residual
            x = x + self.norm1(self.attn(x, rope))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class LatentAttentionPool(nn.Module):
    """timm's ``AttentionPoolLatent`` (PE's pooling): one learned latent queries every token, then an MLP on a
    residual. The same computation as SigLIP's pooling head, under timm's names and with its own head count."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, width] -> [N, width]."""
        batch, length, width = x.shape
        q = self.q(self.latent.to(x.dtype)).view(1, self.heads, 1, -1).expand(batch, -1, -1, -1)
        k, v = self.kv(x).view(batch, length, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        pooled = self.proj(F.scaled_dot_product_attention(q, k, v).reshape(batch, width))
        return pooled + self.mlp(self.norm(pooled))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class ConvNormAct(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, last: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=kernel, bias=last)
        self.bn = nn.Sequential() if last else nn.BatchNorm2d(out_channels)
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.last else F.gelu(self.bn(x))


class MciStem(nn.Module):
    """MobileCLIP-B's patch embedding (timm's ``ConvStem`` in a ``HybridEmbed``): 4x4, 2x2 and 2x2 strided
    convolutions, batch norm and GELU between them: a 16-pixel patch grid."""

    def __init__(self, width: int):
        super().__init__()
        self.backbone = nn.Sequential(ConvNormAct(3, width // 4, 4, False), ConvNormAct(width // 4, width // 4, 2, False),
                                      ConvNormAct(width // 4, width, 2, True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images).flatten(2).transpose(1, 2)


class MbConvBlock(nn.Module):
    """ViTamin's convolution block (timm's ``MbConvLNBlock``): LayerNorm, 1x1 up to 4x, GELU, depthwise 3x3 (stride 2
    in a stage's first block), GELU, 1x1 down; where it downsamples, the shortcut is a 3x3 average pool (and a 1x1
    convolution where the width changes)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        mid = 4 * out_chs
        if stride == 2:
            self.shortcut = nn.Module()
            self.shortcut.pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
            self.shortcut.expand = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()
        else:
            self.shortcut = None
        self.pre_norm = LayerNorm2d(in_chs, eps=1e-6)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid, 1)
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid)
        self.conv3_1x1 = nn.Conv2d(mid, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut.expand(self.shortcut.pool(x))
        x = _gelu(self.conv2_kxk(_gelu(self.conv1_1x1(self.pre_norm(x)))))
        return self.conv3_1x1(x) + shortcut


class VitaminStem(nn.Module):
    """ViTamin's token embedding (timm's ``MbConvStages`` in a ``HybridEmbed``): a 3x3 stride-2 convolution,
    LayerNorm + GELU, a 3x3 convolution; two stages of ``MbConvBlock`` (2 and 4 blocks, each halving the resolution);
    a LayerNorm and a 3x3 stride-2 convolution to the transformer's width: a 16-pixel token grid."""

    def __init__(self, dims: list[int], width: int):
        super().__init__()
        first, second = dims
        self.backbone = nn.Module()
        self.backbone.stem = nn.Module()
        self.backbone.stem.conv1 = nn.Conv2d(3, first, 3, 2, 1)
        self.backbone.stem.norm1 = LayerNorm2d(first, eps=1e-6)
        self.backbone.stem.conv2 = nn.Conv2d(first, first, 3, 1, 1)
        self.backbone.stages = nn.Sequential(
            nn.Sequential(MbConvBlock(first, first, 2), MbConvBlock(first, first, 1)),
            nn.Sequential(MbConvBlock(first, second, 2), *[MbConvBlock(second, second, 1) for _ in range(3)]))
        self.backbone.pool = nn.Module()
        self.backbone.pool.norm = LayerNorm2d(second, eps=1e-6)
        self.backbone.pool.proj = nn.Conv2d(second, width, 3, 2, 1)
        self.grad_checkpointing = False  # recompute each block in backward (CLIP.set_grad_checkpointing)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = net.stem.conv2(_gelu(net.stem.norm1(net.stem.conv1(images))))
        for stage in net.stages:
            for block in stage:
                x = recomputed(block, x, enabled=self.grad_checkpointing)
        x = net.pool.proj(net.pool.norm(x))
        return x.flatten(2).transpose(1, 2)


class EvaTrunk(nn.Module):
    """timm's ``Eva`` with class-token or latent-attention pooling and a head to ``output_dim`` (what open_clip
    creates)."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, hidden: int,
                 output_dim: int, mlp: str, fused_qkv: bool, inner_norm: bool, post_norm: bool,
                 rope_grid: int | None, eps: float, key_bias: bool = False, rope_offset: float = 0.0,
                 rope_indexing: str = "ij", class_token: bool = True, norm_pre: bool = False, pool: str = "token",
                 pool_heads: int = 8, stem: str = "patch", class_position: bool = True,
                 stem_dims: list[int] | None = None, pos_embed: bool = True, head: bool = True):
        """``stem``: "patch" (one patch-sized convolution), "mci" (``MciStem``) or "vitamin" (``VitaminStem``, its
        two stages' widths ``stem_dims``); ``class_position``: whether the class token has a learned position (timm's
        ``no_embed_class`` is False); ``pool``: the class token, "map" (latent attention) or "avg" (the mean token,
        then ``fc_norm`` in place of the final LayerNorm); ``head``: timm's biased linear head (else none)."""
        super().__init__()
        if pool not in ("token", "map", "avg") or (pool == "token" and not class_token) or \
                (pool == "avg" and class_token):
            raise ValueError(f"EVA pool must be 'token' (with a class token), 'map' or 'avg' (without), got {pool!r}")
        if stem not in ("patch", "mci", "vitamin") or (stem != "patch" and patch_size != 16) or \
                (stem == "vitamin" and len(stem_dims or []) != 2):
            raise ValueError(f"EVA stem must be 'patch', 'mci' or 'vitamin' (16-pixel tokens; vitamin with two "
                             f"stem_dims), got {stem!r}")
        grid = image_size // patch_size
        prefix = int(class_token)
        self.grad_checkpointing = False  # recompute each block in backward (CLIP.set_grad_checkpointing)
        self.patch_embed = PatchEmbed(patch_size, width, bias=not norm_pre) if stem == "patch" else \
            MciStem(width) if stem == "mci" else VitaminStem(list(stem_dims), width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        self.class_position = class_position
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + (prefix if class_position else 0), width)) \
            if pos_embed else None
        self.norm_pre = LayerNorm(width, eps=eps) if norm_pre else nn.Identity()
        self.blocks = nn.ModuleList([EvaBlock(width, heads, hidden, mlp, fused_qkv, inner_norm, post_norm, eps,
                                              key_bias, prefix) for _ in range(layers)])
        self.norm = LayerNorm(width, eps=eps) if pool != "avg" else nn.Identity()
        self.fc_norm = LayerNorm(width, eps=eps) if pool == "avg" else None
        self.attn_pool = LatentAttentionPool(width, pool_heads, 4.0, eps) if pool == "map" else None
        self.head = nn.Linear(width, output_dim) if head else nn.Identity()
        rope = rope_table(grid, width // heads, rope_grid, rope_offset, rope_indexing) if rope_grid else None
        self.register_buffer("rope", rope, persistent=False)  # a function of the shape: not in checkpoints
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's: truncated normal (std 0.02) for positions, class token and linear weights; zero biases."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The blocks' input: [N, (class token +) grid*grid, width], with positions, after ``norm_pre``."""
        x = self.patch_embed(images)
        positions = self.pos_embed is not None
        if positions and not self.class_position:  # positions for the patches only, the class token joins after
            x = x + self.pos_embed.to(x.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.norm_pre(x + self.pos_embed.to(x.dtype) if positions and self.class_position else x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's tokens after the final LayerNorm: [N, (class token +) grid*grid, width]."""
        x = self._tokens(images)
        for block in self.blocks:
            x = recomputed(block, x, self.rope, enabled=self.grad_checkpointing)
        return self.norm(x)

    def forward_intermediates(self, images: torch.Tensor, indices=None, stop_early: bool = False,
                              norm: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's: ``(the last block's tokens after the final norm, the tokens of the blocks ``indices`` names, each
        through that norm where ``norm``)``; ``stop_early``: no block after the last one asked for runs."""
        taken, last = take_indices(len(self.blocks), indices)
        x, intermediates = self._tokens(images), []
        for i, block in enumerate(self.blocks[: last + 1] if stop_early else self.blocks):
            x = recomputed(block, x, self.rope, enabled=self.grad_checkpointing)
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        return self.norm(x), intermediates

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features``' tokens -> the pooled, projected embedding."""
        if self.fc_norm is not None:
            return self.head(self.fc_norm(x.mean(dim=1)))
        return self.head(self.attn_pool(x) if self.attn_pool is not None else x[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


# the trunk settings a ``vision_cfg`` may carry beyond the shared ones (PE's, MobileCLIP-B's, ViTamin's; ``EvaTrunk``)
TRUNK_SETTINGS = ("key_bias", "rope_offset", "rope_indexing", "class_token", "norm_pre", "pool", "pool_heads", "stem",
                  "class_position", "stem_dims", "pos_embed")


class EvaVisionTower(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 mlp_ratio: float, mlp: str = "gelu", fused_qkv: bool = True, inner_norm: bool = False,
                 post_norm: bool = False, rope_grid: int | None = None, eps: float = 1e-6, proj: str | None = None,
                 **trunk_settings):
        """``trunk_settings``: ``TRUNK_SETTINGS`` (``EvaTrunk``); ``proj``: None (timm's head is the projection) or
        "linear" (open_clip's unbiased projection after a headless trunk, ViTamin's)."""
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if mlp not in ("gelu", "swiglu", "geglu"):
            raise ValueError(f"EVA mlp must be 'gelu', 'swiglu' or 'geglu', got {mlp!r}")
        if proj not in (None, "linear"):
            raise ValueError(f"EVA proj must be None (timm's head) or 'linear', got {proj!r}")
        self.image_size, self.patch_size, self.output_dim = image_size, patch_size, output_dim
        self.trunk = EvaTrunk(image_size, patch_size, width, layers, heads, int(width * mlp_ratio), output_dim, mlp,
                              fused_qkv, inner_norm, post_norm, rope_grid, eps, head=proj is None, **trunk_settings)
        self.head = None
        if proj == "linear":
            self.head = nn.Module()
            self.head.proj = nn.Linear(width, output_dim, bias=False)
            nn.init.trunc_normal_(self.head.proj.weight, std=0.02)

    @classmethod
    def from_config(cls, cfg: dict, output_dim: int) -> "EvaVisionTower":
        """The tower a ``vision_cfg`` (``tower: "eva"``) describes."""
        return cls(image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["width"],
                   layers=cfg["layers"], heads=cfg["heads"], output_dim=output_dim, mlp_ratio=cfg["mlp_ratio"],
                   mlp=cfg.get("mlp", "gelu"), fused_qkv=cfg.get("fused_qkv", True),
                   inner_norm=cfg.get("inner_norm", False), post_norm=cfg.get("post_norm", False),
                   rope_grid=cfg.get("rope_grid"), eps=cfg.get("norm_eps", 1e-6), proj=cfg.get("proj"),
                   **{k: cfg[k] for k in TRUNK_SETTINGS if k in cfg})

    def lock_groups(self) -> list:
        """open_clip's lock groups, timm's for a ViT trunk: the embeddings (with a stem and ``norm_pre``), each block
        (the last with the final norm), then the pooling and heads."""
        return trunk_groups(self, VIT_GROUPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_image_batch(images, self.image_size)
        features = self.trunk(images)
        return features if self.head is None else self.head.proj(features)

    def forward_intermediates(self, images: torch.Tensor, indices=None, stop_early: bool = False,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NCHW", output_extra_tokens: bool = False) -> dict:
        """open_clip's ``forward_intermediates`` for this tower (timm's trunk's, as open_clip's ``TimmModel`` calls
        it): ``{"image_intermediates": the outputs of the blocks ``indices`` names (None: all; n: the last n; a list:
        those) as patch maps [N, width, grid, grid] ("NCHW") or tokens ("NLC"), "image_intermediates_prefix": their
        class tokens (with ``output_extra_tokens``, where the trunk has one), "image_features": the embedding (unless
        ``intermediates_only``)}``; ``normalize_intermediates``: each through the trunk's final norm."""
        check_image_batch(images, self.image_size)
        x, intermediates = self.trunk.forward_intermediates(images, indices, stop_early, normalize_intermediates)
        prefix = int(self.trunk.cls_token is not None)
        grid = (self.image_size // self.patch_size,) * 2
        patches, prefixes = spatial_intermediates(intermediates, prefix, grid, output_fmt)
        output = {"image_intermediates": patches}
        if output_extra_tokens and prefix:
            output["image_intermediates_prefix"] = prefixes
        if not intermediates_only:
            features = self.trunk.forward_head(x)
            output["image_features"] = features if self.head is None else self.head.proj(features)
        return output

    def forward_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The last layer's patch tokens as a spatial map ``[N, width, grid, grid]`` (after the final LayerNorm,
        before the pooling and head): LiMBer's grid features."""
        check_image_batch(images, self.image_size)
        x = self.trunk.forward_features(images)
        x = x[:, 1:] if self.trunk.cls_token is not None else x
        grid = self.image_size // self.patch_size
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid, grid)
