"""SigLIP's image tower (Zhai et al. 2023, as released by Google and trained by timm/open_clip): patch embedding with
a bias, learned positions and no class token, pre-LN blocks, a final LayerNorm, then attention pooling (MAP) by one
learned query. Its width is the embedding: there is no projection.

Parameter names follow clipforge's ViT (``conv1``, ``positional_embedding``, ``transformer``, ``ln_post``) so the two
towers share their blocks and converters; ``head`` is the pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import check_image_batch
from .layers import Attention, LayerNorm, Transformer, mlp
from .vision_transformer import embed_patches


class AttentionPool(nn.Module):
    """Multi-head attention pooling: a learned query (``probe``) attends over every token, then an MLP on a
    residual, as Hugging Face's ``SiglipMultiheadAttentionPoolingHead`` and timm's ``AttentionPoolLatent`` compute."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-6):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.attn = Attention(width, heads)
        self.ln = LayerNorm(width, eps=eps)
        self.mlp = mlp(width, int(width * mlp_ratio), act)
        nn.init.normal_(self.attn.in_proj_weight, std=width ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, width] -> [N, width]."""
        batch, length, width = x.shape
        heads = self.attn.heads
        weight, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = F.linear(self.probe.to(x.dtype), weight[:width], bias[:width])
        q = q.view(1, heads, 1, width // heads).expand(batch, -1, -1, -1)
        k, v = F.linear(x, weight[width:], bias[width:]).view(batch, length, 2, heads, -1).permute(2, 0, 3, 1, 4)
        pooled = self.attn.out_proj(F.scaled_dot_product_attention(q, k, v).reshape(batch, width))
        return pooled + self.mlp(self.ln(pooled))


class SigLIPVisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-6):
        """An ``image_size`` need not be a multiple of ``patch_size``: the patches cover the top-left ``grid *
        patch_size`` pixels, as timm's SO400M/14 at 384 pixels does (27 x 27 patches)."""
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.output_dim = width
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=True)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid, width) * width ** -0.5)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act=act, eps=eps)
        self.ln_post = LayerNorm(width, eps=eps)
        self.head = AttentionPool(width, heads, mlp_ratio, act, eps)
        self.transformer.init_parameters()

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        check_image_batch(images, self.image_size)
        x = embed_patches(self.conv1, images)
        return (x + self.positional_embedding.to(x.dtype)).contiguous()  # the conv's tokens are a transposed view

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_post(self.transformer(self._tokens(images))))

    def forward_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The last layer's patch tokens as a spatial map ``[N, width, grid, grid]`` (after ``ln_post``, before the
        pooling)."""
        x = self.ln_post(self.transformer(self._tokens(images)))
        grid = self.image_size // self.patch_size
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid, grid)
