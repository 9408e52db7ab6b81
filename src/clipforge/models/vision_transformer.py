"""CLIP's Vision Transformer: patchify, class token, learned positions, pre-LN blocks, class-token projection.

CLIPA's is the same tower with three settings changed: no LayerNorm before the blocks (``ln_pre=False``), features
averaged over the patch tokens (``pool="avg"``, the class token left out) and ``ln_post`` applied after that average
(``final_ln_after_pool``), as open_clip's ``no_ln_pre``, ``pool_type`` and ``final_ln_after_pool`` build it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import check_image_batch
from .intermediates import spatial_intermediates
from .layers import LayerNorm, Transformer, autocast_dtype


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)*(W/p), C*p*p]: each patch flattened in a patch-sized convolution weight's order
    (channel, row, column), patches in row-major order."""
    n, channels, height, width = images.shape
    p = patch_size
    return (images.reshape(n, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
            .reshape(n, (height // p) * (width // p), channels * p * p))


def embed_patches(conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """A patch-sized, patch-strided ``conv`` over images, as tokens [N, grid*grid, width]. On GPU as one matrix
    product over the flattened patches (the same sums): cuDNN's weight gradient for a patch-sized stride is several
    times slower than the GEMM's. The image is cast to the product's dtype before patches are gathered, halving that
    copy under bf16 autocast."""
    if not images.is_cuda:
        return conv(images).flatten(2).transpose(1, 2)
    p = conv.kernel_size[0]
    height, width = images.shape[-2] // p * p, images.shape[-1] // p * p  # the pixels the convolution covers
    patches = patchify(images[..., :height, :width].to(autocast_dtype(images)), p)
    return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def interpolated_positions(table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A square grid's learned positions [grid*grid, width] resized to a ``rows`` x ``cols`` patch grid [rows*cols,
    width] as transformers' ``interpolate_pos_encoding`` resizes them (bicubic, corners not aligned, no
    antialiasing; here in float32); the table itself where the grid is its own."""
    grid = round(table.shape[0] ** 0.5)
    if (rows, cols) == (grid, grid):
        return table
    if rows < 1 or cols < 1:
        raise ValueError(f"images smaller than one patch ({rows}x{cols} patches)")
    square = table.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(rows, cols), mode="bicubic", align_corners=False)
    return resized[0].flatten(1).T.to(table.dtype)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
        patch_dropout: float = 0.0,
        pool: str = "tok",
        ln_pre: bool = True,
        final_ln_after_pool: bool = False,
        ls_init_value: float | None = None,
    ):
        """``pool``: "tok" (CLIP: the class token) or "avg" (the mean of the patch tokens); ``final_ln_after_pool``:
        ``ln_post`` on the pooled vector rather than on every token before pooling (the same for "tok");
        ``ls_init_value``: LayerScale on the blocks' residual branches (open_clip's ViT-M-16-alt)."""
        super().__init__()
        if pool not in ("tok", "avg"):
            raise ValueError(f"ViT pool must be 'tok' or 'avg', got {pool!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.patch_dropout = patch_dropout
        self.pool, self.final_ln_after_pool = pool, final_ln_after_pool
        grid = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width) if ln_pre else nn.Identity()
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu, ls_init_value=ls_init_value)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.transformer.init_parameters()

    def _embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        return embed_patches(self.conv1, images)

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """FLIP's patch dropout: keep a random subset of patch tokens (class token always kept) while training."""
        keep = max(1, int(x.shape[1] * (1.0 - self.patch_dropout)))
        scores = torch.rand(x.shape[0], x.shape[1], device=x.device)
        index = scores.topk(keep, dim=1).indices
        return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def lock_groups(self) -> list:
        """The tower's parameters in open_clip's lock groups, input side first (``CLIP.lock_image_tower``)."""
        blocks = list(self.transformer.resblocks)
        return [[self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre], *([b] for b in blocks[:-1]),
                [blocks[-1], self.ln_post], [self.proj]]

    def forward(self, images: torch.Tensor, interpolate_positions: bool = False) -> torch.Tensor:
        """``interpolate_positions``: images of any size, the position grid resized to theirs for this call
        (``interpolated_positions``; ``clipforge.load(..., force_image_size=...)`` resizes it once instead)."""
        x = self._tokens(images, interpolate_positions)
        if self.pool == "avg":  # every patch token is pooled
            return self._pool(self.transformer(x))[0]
        cls_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = self.transformer(x, pool_index=cls_index)  # [N, width]: only the class token is pooled
        return self._project(self.ln_post(x))

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [N, output_dim], patch tokens [N, grid*grid, width])``: the tokens a CoCa decoder reads from a
        tower without attentional pooling (open_clip's ``output_tokens``; its coca_base), the last block's after
        ``ln_post`` (before it where ``final_ln_after_pool``), not projected."""
        return self._pool(self.transformer(self._tokens(images)))

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's output [N, 1 + patches, width] -> ``(embedding, patch tokens)`` as ``forward_tokens``."""
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        pooled = x[:, 1:].mean(dim=1) if self.pool == "avg" else x[:, 0]
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return self._project(pooled), x[:, 1:]

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.proj is None else pooled @ self.proj  # None: pruned (``prune_intermediate_layers``)

    def _normalize_intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(x)

    def forward_intermediates(self, images: torch.Tensor, indices=None, stop_early: bool = False,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NCHW", output_extra_tokens: bool = False) -> dict:
        """open_clip's ``forward_intermediates`` for this tower: ``{"image_intermediates": the outputs of the blocks
        ``indices`` names (None: all; n: the last n; a list: those, negative from the end) as patch maps [N, width,
        grid, grid] ("NCHW") or tokens [N, grid*grid, width] ("NLC"), "image_intermediates_prefix": their class
        tokens [N, 1, width] (with ``output_extra_tokens``), "image_features": the embedding (unless
        ``intermediates_only``)}``. ``normalize_intermediates``: each through ``ln_post``; ``stop_early``: no
        block after the last one asked for runs (the embedding then comes from that block, as open_clip's)."""
        x = self._tokens(images)
        x, intermediates = self.transformer.forward_intermediates(x, indices, stop_early)
        if normalize_intermediates:
            intermediates = [self._normalize_intermediate(t) for t in intermediates]
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        patches, prefixes = spatial_intermediates(intermediates, 1, grid, output_fmt)
        output = {"image_intermediates": patches}
        if output_extra_tokens:
            output["image_intermediates_prefix"] = prefixes
        if not intermediates_only:
            output["image_features"] = self._pool(x)[0]
        return output

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Keep the blocks up to the last one ``indices`` names (as ``forward_intermediates`` reads it) and drop
        the rest; ``prune_norm`` drops ``ln_post``, ``prune_head`` the projection (the embedding is then the pooled
        token of the last kept block, ``width`` wide). Returns the block indices taken, as open_clip's."""
        taken = self.transformer.prune(indices)
        self.pruned = True  # the config no longer describes this tower: checkpoint.io.savable_state refuses it
        if prune_norm:
            self.ln_post = nn.Identity()
        if prune_head:
            self.proj = None
            self.output_dim = self.transformer.width
        return taken

    def forward_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The last layer's patch tokens as a spatial map ``[N, width, grid, grid]`` (after ``ln_post``, before the
        projection, which maps the class token only)."""
        x = self.ln_post(self.transformer(self._tokens(images)))[:, 1:]
        grid = self.image_size // self.patch_size
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid, grid)

    def _tokens(self, images: torch.Tensor, interpolate_positions: bool = False) -> torch.Tensor:
        """Class token + patch tokens with positions, after ``ln_pre``: the transformer's input."""
        check_image_batch(images, None if interpolate_positions else self.image_size)
        x = self._embed_patches(images)  # [N, rows*cols, width]
        positions = self.positional_embedding[1:]
        if interpolate_positions:
            rows, cols = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
            positions = interpolated_positions(positions, rows, cols)
        x = x + positions.to(x.dtype)
        if self.training and self.patch_dropout > 0:
            x = self._drop_patches(x)
        cls = (self.class_embedding + self.positional_embedding[0]).to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.ln_pre(x)
