"""Transformer building blocks shared by the vision and text towers.

Parameter names follow OpenAI CLIP's ``model.py`` (``in_proj_weight``, ``out_proj``, ``c_fc``, ``c_proj``,
``ln_1``, ``ln_2``) so that OpenAI and open_clip state dicts load without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by OpenAI's released weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so fp16/bf16 weights stay numerically stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and ``scaled_dot_product_attention``.

    Same parameters as ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) so released
    checkpoints map one to one, but the kernel is SDPA (flash / memory-efficient on GPU).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out)

    def forward_pooled(self, x: torch.Tensor, pool_index: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Attention output at one position per row (``pool_index``), keys and values from every position.

        Only the pooled token's output survives the last block, so its queries, output projection (and the MLP
        after it) are computed for that one row instead of all ``length``: same result, a fraction of the work.
        """
        batch, length, width = x.shape
        head_dim = width // self.heads
        kv = F.linear(x, self.in_proj_weight[width:], self.in_proj_bias[width:])
        k, v = kv.view(batch, length, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        pooled = x[torch.arange(batch, device=x.device), pool_index]
        q = F.linear(pooled, self.in_proj_weight[:width], self.in_proj_bias[:width]).view(batch, self.heads, 1, head_dim)
        mask = None
        if causal:  # the pooled row sees itself and what came before it
            mask = (torch.arange(length, device=x.device) <= pool_index[:, None]).view(batch, 1, 1, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.reshape(batch, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, causal: bool = False, pool_index: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L, width] -> [N, L, width]; with ``pool_index`` (one position per row) -> [N, width] at those rows."""
        if pool_index is None:
            x = x + self.attn(self.ln_1(x), causal=causal)
            return x + self.mlp(self.ln_2(x))
        x_pooled = x[torch.arange(x.shape[0], device=x.device), pool_index]
        x_pooled = x_pooled + self.attn.forward_pooled(self.ln_1(x), pool_index, causal=causal)
        return x_pooled + self.mlp(self.ln_2(x_pooled))


class Transformer(nn.Module):
    """A stack of residual attention blocks, batch-first, with optional gradient checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, causal: bool = False, pool_index: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L, width] -> [N, L, width], or [N, width] at ``pool_index`` when the caller pools one token per row
        (the last block then computes only those rows)."""
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            index = pool_index if i == last else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, index, use_reentrant=False)
            else:
                x = block(x, causal=causal, pool_index=index)
        return x

    def init_parameters(self) -> None:
        """OpenAI CLIP's initialisation: residual projections scaled down with depth."""
        proj_std = (self.width ** -0.5) * ((2 * self.layers) ** -0.5)
        attn_std = self.width ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
