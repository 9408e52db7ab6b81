"""SigLIP's image tower (Zhai et al. 2023, as released by Google and trained by timm/open_clip): patch embedding with
a bias, learned positions and no class token, pre-LN blocks, a final LayerNorm, then attention pooling (MAP) by one
learned query. Its width is the embedding: there is no projection.

Parameter names follow clipforge's ViT (``conv1``, ``positional_embedding``, ``transformer``, ``ln_post``) so the two
towers share their blocks and converters; ``head`` is the pooling.

SigLIP 2's NaFlex towers (``naflex``: transformers' ``Siglip2VisionModel``) take images at their own aspect ratio:
each is a grid of patches of its own shape, the learned position grid resized to it (bilinear, antialiased), and a
batch is padded to one length and masked. They take transformers' processor output as it is (``pixel_values``,
``pixel_attention_mask``, ``spatial_shapes``: ``preprocess.NaFlexPreprocess`` gives the same), or plain image
tensors of any size in whole patches.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import check_image_batch
from .intermediates import spatial_intermediates
from .layers import Attention, LayerNorm, Transformer, mlp
from .vision_transformer import embed_patches, interpolated_positions


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

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L, width] -> [N, width]; ``visible`` [N, L]: the tokens that are not padding (all, without)."""
        batch, length, width = x.shape
        heads = self.attn.heads
        weight, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = F.linear(self.probe.to(x.dtype), weight[:width], bias[:width])
        q = q.view(1, heads, 1, width // heads).expand(batch, -1, -1, -1)
        k, v = F.linear(x, weight[width:], bias[width:]).view(batch, length, 2, heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if visible is None else visible[:, None, None, :]
        pooled = self.attn.out_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(batch, width))
        return pooled + self.mlp(self.ln(pooled))


def is_naflex_batch(images) -> bool:
    """Whether ``images`` is a NaFlex batch: a mapping of transformers' ``pixel_values``, ``spatial_shapes`` (and
    ``pixel_attention_mask``), as its ``BatchFeature`` is."""
    return isinstance(images, Mapping) and "pixel_values" in images and "spatial_shapes" in images


class SigLIPVisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-6, naflex: bool = False):
        """An ``image_size`` need not be a multiple of ``patch_size``: the patches cover the top-left ``grid *
        patch_size`` pixels, as timm's SO400M/14 at 384 pixels does (27 x 27 patches). ``naflex``: SigLIP 2's
        variable-shape tower, its position grid that of ``image_size`` (16 x 16 for 256 patches of 16 pixels)."""
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.naflex = naflex
        self.output_dim = width
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=True)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid, width) * width ** -0.5)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act=act, eps=eps)
        self.ln_post = LayerNorm(width, eps=eps)
        self.head = AttentionPool(width, heads, mlp_ratio, act, eps)
        self.transformer.init_parameters()

    def lock_groups(self) -> list:
        """The tower's parameters in open_clip's lock groups (timm's for its trunk), input side first: the patch
        embedding with the positions, each block, the last block with the final LayerNorm, the attention pooling."""
        blocks = list(self.transformer.resblocks)
        return [[self.conv1, self.positional_embedding], *([b] for b in blocks[:-1]), [blocks[-1], self.ln_post],
                [self.head]]

    def _grid_of(self, images: torch.Tensor, interpolate_positions: bool = False) -> tuple[int, int]:
        """The patch grid an image batch makes: the model's own, or for a NaFlex tower any whole number of patches
        (``interpolate_positions``: the patches of an image of any size, as the patch convolution covers it)."""
        if not self.naflex:
            check_image_batch(images, None if interpolate_positions else self.image_size)
            return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            check_image_batch(images, self.image_size)  # its error names what is wrong
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"a NaFlex tower takes images in whole {self.patch_size}-pixel patches, got "
                             f"{height}x{width}")
        return height // self.patch_size, width // self.patch_size

    def _positions(self, rows: int, cols: int) -> torch.Tensor:
        """The learned positions for a ``rows`` x ``cols`` patch grid [rows * cols, width]: the model's own grid, or
        (NaFlex) that grid resized as transformers' ``Siglip2VisionEmbeddings`` resizes it, in float32."""
        grid = self.image_size // self.patch_size
        if (rows, cols) == (grid, grid):
            return self.positional_embedding
        table = self.positional_embedding.float().reshape(grid, grid, -1).permute(2, 0, 1)[None]
        resized = F.interpolate(table, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
        return resized[0].flatten(1).T.to(self.positional_embedding.dtype)

    def _tokens(self, images: torch.Tensor, interpolate_positions: bool = False) -> torch.Tensor:
        rows, cols = self._grid_of(images, interpolate_positions)
        x = embed_patches(self.conv1, images)
        positions = (interpolated_positions(self.positional_embedding, rows, cols) if interpolate_positions
                     and not self.naflex else self._positions(rows, cols))
        return (x + positions.to(x.dtype)).contiguous()  # the conv's tokens are a transposed view

    def _naflex_tokens(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens [N, L, width], visible [N, L] or None)`` for a NaFlex batch: flattened patches (rows, then
        columns, then channels within a patch, as transformers' processor orders them), padded to one length L."""
        if not self.naflex:
            raise ValueError("patchified images (pixel_values with spatial_shapes) are for SigLIP 2's NaFlex towers; "
                             f"this one takes [N, 3, {self.image_size}, {self.image_size}] images")
        patches, shapes = batch["pixel_values"], torch.as_tensor(batch["spatial_shapes"]).cpu()
        weight, p = self.conv1.weight, self.patch_size
        if patches.ndim != 3 or patches.shape[-1] != 3 * p * p or shapes.shape != (patches.shape[0], 2):
            raise ValueError(f"expected pixel_values [N, L, {3 * p * p}] and spatial_shapes [N, 2], got "
                             f"{tuple(patches.shape)} and {tuple(shapes.shape)}")
        if (shapes.prod(-1) > patches.shape[1]).any() or (shapes < 1).any():
            raise ValueError(f"spatial_shapes {shapes.tolist()} do not fit {patches.shape[1]} patches per image")
        x = F.linear(patches.to(weight.dtype), weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1), self.conv1.bias)
        positions = torch.empty_like(x)
        for rows, cols in {tuple(shape) for shape in shapes.tolist()}:
            same = ((shapes[:, 0] == rows) & (shapes[:, 1] == cols)).nonzero()[:, 0].to(x.device)
            table = self._positions(rows, cols).to(x.dtype)
            positions[same, :rows * cols] = table
            # padding takes the first position's, as transformers' does: masked out of every real token's attention,
            # so only the padding rows of the hidden states see it
            positions[same, rows * cols:] = table[0]
        mask = batch.get("pixel_attention_mask")
        return x + positions, None if mask is None else mask.to(x.device).bool()

    def forward(self, images: torch.Tensor | Mapping, interpolate_positions: bool = False) -> torch.Tensor:
        """``interpolate_positions``: images of any size, the position grid resized to theirs for this call
        (bicubic, as transformers' ``interpolate_pos_encoding``; a NaFlex tower resizes it for every image)."""
        if is_naflex_batch(images):
            x, visible = self._naflex_tokens(images)
            mask = None if visible is None else visible[:, None, None, :]  # keys a token may attend to
            return self.head(self.ln_post(self.transformer(x, attn_mask=mask)), visible)
        return self.head(self.ln_post(self.transformer(self._tokens(images, interpolate_positions))))

    def forward_intermediates(self, images: torch.Tensor, indices=None, stop_early: bool = False,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NCHW", output_extra_tokens: bool = False) -> dict:
        """open_clip's ``forward_intermediates`` for this tower (timm's, which open_clip's SigLIP calls):
        ``{"image_intermediates": the outputs of the blocks ``indices`` names (None: all; n: the last n; a list:
        those) as patch maps [N, width, rows, cols] ("NCHW") or tokens ("NLC"), "image_features": the embedding
        (unless ``intermediates_only``)}``; ``normalize_intermediates``: each through the final LayerNorm. The tower
        has no class token: ``output_extra_tokens`` adds nothing."""
        if is_naflex_batch(images):
            raise ValueError("forward_intermediates takes an image tensor; a NaFlex batch has a grid of its own per "
                             "image")
        grid = self._grid_of(images)
        x, intermediates = self.transformer.forward_intermediates(self._tokens(images), indices, stop_early)
        if normalize_intermediates:
            intermediates = [self.ln_post(t) for t in intermediates]
        output = {"image_intermediates": spatial_intermediates(intermediates, 0, grid, output_fmt)[0]}
        if not intermediates_only:
            output["image_features"] = self.head(self.ln_post(x))
        return output

    def forward_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The last layer's patch tokens as a spatial map ``[N, width, rows, cols]`` (after ``ln_post``, before the
        pooling)."""
        if is_naflex_batch(images):
            raise ValueError("forward_grid takes an image tensor; a NaFlex batch has a grid of its own per image")
        rows, cols = self._grid_of(images)
        x = self.ln_post(self.transformer(self._tokens(images)))
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], rows, cols)
