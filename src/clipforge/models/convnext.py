"""ConvNeXt image towers (Liu et al. 2022), as LAION trained them for open_clip: timm's ConvNeXt (``trunk``) with its
average pool and LayerNorm head, then a linear projection or a two-layer MLP (``head``).

Module names are timm's and open_clip's (``trunk.stem``, ``trunk.stages.N.downsample``, ``trunk.stages.N.blocks.M``
with ``conv_dw``, ``norm``, ``mlp.fc1``, ``mlp.fc2``, ``gamma``; ``trunk.head.norm``; ``head.proj`` or
``head.mlp.fc1/fc2``), so open_clip's ConvNeXt checkpoints load without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import check_image_batch
from .intermediates import stage_intermediates
from .layers import recomputed
from .locking import CONVNEXT_GROUPS, trunk_groups


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``[N, C, H, W]`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, out: int | None = None, bias_out: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or width, bias=bias_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise convolution, LayerNorm, MLP (4x), layer scale ``gamma``, residual."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type) \
                and x.dtype == self.gamma.dtype:
            return self._forward_inference(x)
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))) * self.gamma  # channels last inside
        return x + y.permute(0, 3, 1, 2)

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` without autograd, in fewer passes over memory: the GELU in place, and the residual, the
        output bias and the layer scale taken into the second GEMM (``x + gamma * (W h + b)`` as ``(x + gamma * b)
        + (gamma * W) h``, accumulated by ``addmm_``). The output is channels-last (NHWC in memory), which the next
        block's convolution keeps, so its LayerNorm reads contiguous rows instead of copying them."""
        channels = x.shape[1]
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        hidden = F.linear(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)), fc1.weight, fc1.bias)
        hidden = torch.ops.aten.gelu_(hidden)
        out = torch.empty(x.shape[0], x.shape[2], x.shape[3], channels, dtype=x.dtype, device=x.device)
        torch.add(x.permute(0, 2, 3, 1), fc2.bias * self.gamma, out=out)
        out.view(-1, channels).addmm_(hidden.reshape(-1, hidden.shape[-1]), (fc2.weight * self.gamma[:, None]).t())
        return out.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, eps: float, first: bool):
        super().__init__()
        # every stage but the first halves the resolution: LayerNorm, then a 2x2 stride-2 convolution
        self.downsample = nn.Identity() if first else nn.Sequential(LayerNorm2d(in_dim, eps=eps),
                                                                    nn.Conv2d(in_dim, dim, kernel_size=2, stride=2))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, eps) for _ in range(depth)])
        self.grad_checkpointing = False  # recompute each block in backward (CLIP.set_grad_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = recomputed(block, x, enabled=self.grad_checkpointing)
        return x


class _Trunk(nn.Module):
    def __init__(self, depths: list[int], dims: list[int], eps: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=eps))
        self.stages = nn.Sequential(*[ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], eps, i == 0)
                                      for i in range(len(depths))])
        self.head = nn.Module()
        self.head.norm = LayerNorm2d(dims[-1], eps=eps)


class ConvNeXt(nn.Module):
    def __init__(self, image_size: int, depths: list[int], dims: list[int], output_dim: int, proj: str = "linear",
                 eps: float = 1e-6):
        super().__init__()
        if proj not in ("linear", "mlp"):
            raise ValueError(f"ConvNeXt proj must be 'linear' or 'mlp', got {proj!r}")
        self.image_size = image_size
        self.output_dim = output_dim
        self.trunk = _Trunk(depths, dims, eps)
        self.head = nn.Module()
        if proj == "linear":
            self.head.proj = nn.Linear(dims[-1], output_dim, bias=False)
        else:  # open_clip's "mlp" (the large_d models): GELU between, no bias on the output
            self.head.mlp = Mlp(dims[-1], 2 * output_dim, output_dim, bias_out=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def lock_groups(self) -> list:
        """open_clip's lock groups, timm's for ConvNeXt: the stem, each block (a stage's downsampling with its first),
        then the final norm with the head."""
        return trunk_groups(self, CONVNEXT_GROUPS)

    def forward_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map ``[N, C, H/32, W/32]`` (before pooling)."""
        check_image_batch(images, self.image_size)
        return self.trunk.stages(self.trunk.stem(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._pool(self.forward_grid(images))

    def _pool(self, grid: torch.Tensor) -> torch.Tensor:
        """The last stage's map -> the embedding: averaged, timm's head norm, open_clip's projection."""
        pooled = self.trunk.head.norm(grid.mean(dim=(2, 3), keepdim=True)).flatten(1)
        head = self.head
        return head.proj(pooled) if hasattr(head, "proj") else head.mlp(pooled)

    def forward_intermediates(self, images: torch.Tensor, indices=None, stop_early: bool = False,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NCHW", output_extra_tokens: bool = False) -> dict:
        """open_clip's ``forward_intermediates`` for this tower (timm's trunk's, as open_clip's ``TimmModel`` calls
        it): ``{"image_intermediates": the maps of the stages ``indices`` names (4: None for all, n for the last n, a
        list for those), "image_features": the embedding (unless ``intermediates_only``)}``. timm's ConvNeXt has no
        norm before its head's pooling and no extra tokens: those flags change nothing."""
        check_image_batch(images, self.image_size)
        return stage_intermediates(self.trunk.stem(images), list(self.trunk.stages), self._pool, indices, stop_early,
                                   intermediates_only, output_fmt)
