"""MobileCLIP's image towers (Vasu et al. 2024; MobileCLIP-S1/S2 and MobileCLIP2-S0/S2/S3/S4): Apple's FastViT "MCi"
as timm builds it (``fastvit_mci0`` .. ``fastvit_mci4``) and open_clip wraps it, a convolutional network whose early
stages mix tokens with depthwise convolutions (RepMixer) and whose last one or two stages use self-attention:

- a stem of three MobileOne blocks (3x3 stride 2, depthwise 3x3 stride 2, 1x1), to a quarter of the resolution;
- stages of blocks, each stage after the first entered through a strided 7x7 depthwise convolution (with a 3x3
  beside it and squeeze-excite on the later stages) and a 1x1 MobileOne block; the attention stages start with a
  7x7 depthwise positional convolution (conditional position encoding);
- RepMixer blocks: ``x + s * (mixer(x) - norm(x))`` with depthwise 3x3 branches, then a convolutional MLP (7x7
  depthwise + BatchNorm, 1x1 up, GELU, 1x1 down) under a layer scale; attention blocks: BatchNorm (LayerNorm on the
  MobileCLIP2-S3/S4 towers), 32-wide heads, the same MLP, each under a layer scale;
- a final depthwise 3x3 MobileOne block doubling the channels, with squeeze-excite; average pool; a biased linear
  head to the embedding.

Each "MobileOne" convolution is trained as parallel branches (kxk conv + BatchNorm, 1x1 conv + BatchNorm, a
BatchNorm alone as the identity), as RepVGG does. In eval mode every such group runs as the one convolution it equals
(RepVGG's re-parameterisation, recomputed from the weights at each call, so the state dict keeps the trained form and
open_clip's and timm's checkpoints load as they are), on channels-last maps. Module names are timm's, under ``trunk``
as open_clip's ``TimmModel`` keeps them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .convnext import LayerNorm2d
from .inputs import check_image_batch
from .intermediates import stage_intermediates
from .locking import FASTVIT_GROUPS, trunk_groups

Kernel = tuple[torch.Tensor, torch.Tensor]  # a convolution's weight and bias


def _bn_scale(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` an eval-mode BatchNorm applies."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale, bn.bias - bn.running_mean * scale


def _identity_kernel(channels: int, groups: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """The ``size`` x ``size`` grouped convolution kernel that returns its input."""
    kernel = torch.zeros(channels, channels // groups, size, size, dtype=like.dtype, device=like.device)
    kernel[torch.arange(channels), torch.arange(channels) % (channels // groups), size // 2, size // 2] = 1
    return kernel


def _pad_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4)


def _rd_channels(channels: int, ratio: float, divisor: int) -> int:
    """timm's ``make_divisible(channels * ratio, divisor, round_limit=0)``: the squeeze width."""
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


class ConvNorm(nn.Module):
    """An unbiased convolution and its BatchNorm (timm's ``ConvNormAct`` without an activation)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fused(self) -> Kernel:
        scale, shift = _bn_scale(self.bn)
        return self.conv.weight * scale.reshape(-1, 1, 1, 1), shift


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class MobileOneBlock(nn.Module):
    """A convolution trained as branches: ``conv_kxk`` (conv + BN, ``branches`` of them), ``conv_scale`` (a 1x1
    conv + BN beside a larger kernel) and ``identity`` (a BN alone, where the shape allows); then squeeze-excite and
    GELU where asked."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 use_se: bool = False, act: bool = True, scale_branch: bool = True, branches: int = 1):
        super().__init__()
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.in_chs, self.out_chs = in_chs, out_chs
        self.se = SqueezeExcite(out_chs, _rd_channels(out_chs, 1 / 16, 1)) if use_se else nn.Identity()
        self.identity = nn.BatchNorm2d(in_chs) if in_chs == out_chs and stride == 1 else None
        self.conv_kxk = nn.ModuleList([ConvNorm(in_chs, out_chs, kernel_size, stride, groups)
                                       for _ in range(branches)]) if branches else None
        self.conv_scale = ConvNorm(in_chs, out_chs, 1, stride, groups) if kernel_size > 1 and scale_branch else None
        self.act = nn.GELU() if act else nn.Identity()

    def fused(self) -> Kernel:
        """The one convolution the branches sum to (valid with BatchNorm's running statistics)."""
        parts = [branch.fused() for branch in (self.conv_kxk or [])]
        if self.conv_scale is not None:
            weight, bias = self.conv_scale.fused()
            parts.append((_pad_to(weight, self.kernel_size), bias))
        if self.identity is not None:
            scale, shift = _bn_scale(self.identity)
            identity = _identity_kernel(self.in_chs, self.groups, self.kernel_size, scale)
            parts.append((identity * scale.reshape(-1, 1, 1, 1), shift))
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def branches(self, x: torch.Tensor) -> torch.Tensor:
        """The trained form (batch statistics in training mode), summed in timm's order."""
        out = (self.conv_scale(x) if self.conv_scale is not None else 0) + \
            (self.identity(x) if self.identity is not None else 0)
        for branch in self.conv_kxk or []:
            out = out + branch(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            out = self.branches(x)
        else:
            weight, bias = self.fused()
            out = F.conv2d(x, weight, bias, self.stride, self.kernel_size // 2, groups=self.groups)
        return self.act(self.se(out))


class ReparamLargeKernelConv(nn.Module):
    """A large depthwise kernel with a 3x3 beside it (RepLKNet's), then squeeze-excite and GELU where asked."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, small_kernel: int, use_se: bool):
        super().__init__()
        self.kernel_size, self.stride, self.groups = kernel_size, stride, in_chs
        self.large_conv = ConvNorm(in_chs, out_chs, kernel_size, stride, in_chs)
        self.small_conv = ConvNorm(in_chs, out_chs, small_kernel, stride, in_chs)
        self.se = SqueezeExcite(out_chs, _rd_channels(out_chs, 0.25, 8)) if use_se else nn.Identity()
        self.act = nn.GELU()

    def fused(self) -> Kernel:
        (large, large_bias), (small, small_bias) = self.large_conv.fused(), self.small_conv.fused()
        return large + _pad_to(small, self.kernel_size), large_bias + small_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            out = self.large_conv(x) + self.small_conv(x)
        else:
            weight, bias = self.fused()
            out = F.conv2d(x, weight, bias, self.stride, self.kernel_size // 2, groups=self.groups)
        return self.act(self.se(out))


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class RepMixer(nn.Module):
    """``x + gamma * (mixer(x) - norm(x))``, both depthwise 3x3 MobileOne blocks without activation; in eval mode one
    depthwise convolution (the identity folded in)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, act=False, scale_branch=False, branches=0)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, act=False)
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x + self.layer_scale(self.mixer(x) - self.norm(x))
        (mixer, mixer_bias), (norm, norm_bias) = self.mixer.fused(), self.norm.fused()
        gamma = self.layer_scale.gamma
        weight = _identity_kernel(self.dim, self.dim, self.kernel_size, gamma) + \
            gamma.unsqueeze(-1) * (mixer - norm)
        return F.conv2d(x, weight, gamma.flatten() * (mixer_bias - norm_bias), padding=self.kernel_size // 2,
                        groups=self.dim)


class ConvMlp(nn.Module):
    """7x7 depthwise conv + BatchNorm, then 1x1 up, GELU, 1x1 down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv = ConvNorm(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = self.conv(x)
        else:
            weight, bias = self.conv.fused()
            x = F.conv2d(x, weight, bias, padding=3, groups=x.shape[1])
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Self-attention over the flattened map: 32-wide heads, an unbiased QKV product, a biased output."""

    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        self.heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).reshape(batch, -1, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, channels)
        return self.proj(out).transpose(1, 2).reshape(batch, channels, height, width)


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.token_mixer = RepMixer(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, norm: str):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim) if norm == "batch" else LayerNorm2d(dim, eps=1e-5)
        self.token_mixer = Attention(dim)
        self.layer_scale_1 = LayerScale2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_2 = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))


class PatchEmbed(nn.Module):
    """A stage's entry: 7x7 stride-2 depthwise (with its 3x3 branch) to the new width, then a 1x1 MobileOne block."""

    def __init__(self, in_chs: int, out_chs: int, use_se: bool):
        super().__init__()
        self.proj = nn.Sequential(ReparamLargeKernelConv(in_chs, out_chs, 7, 2, 3, use_se),
                                  MobileOneBlock(out_chs, out_chs, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RepConditionalPosEnc(nn.Module):
    """``x + depthwise7x7(x)``: positions the attention stage reads from the map itself."""

    def __init__(self, dim: int, size: int = 7):
        super().__init__()
        self.pos_enc = nn.Conv2d(dim, dim, size, 1, size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_enc(x) + x


class FastVitStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, mixer: str, mlp_ratio: float, se_downsample: bool,
                 norm: str):
        super().__init__()
        self.downsample = PatchEmbed(in_dim, dim, se_downsample) if in_dim != dim else nn.Identity()
        # every MobileCLIP tower gives exactly its attention stages a conditional position encoding
        self.pos_emb = RepConditionalPosEnc(dim) if mixer == "attention" else nn.Identity()
        self.blocks = nn.Sequential(*[RepMixerBlock(dim, mlp_ratio) if mixer == "repmixer" else
                                      AttentionBlock(dim, mlp_ratio, norm) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.pos_emb(self.downsample(x)))


class _Trunk(nn.Module):
    def __init__(self, depths: list[int], dims: list[int], mixers: list[str], mlp_ratio: float,
                 se_downsample: list[bool], norm: str, stem_scale_branch: bool, output_dim: int):
        super().__init__()
        stem = dims[0]
        self.stem = nn.Sequential(MobileOneBlock(3, stem, 3, 2, scale_branch=stem_scale_branch),
                                  MobileOneBlock(stem, stem, 3, 2, groups=stem, scale_branch=stem_scale_branch),
                                  MobileOneBlock(stem, stem, 1, scale_branch=stem_scale_branch))
        self.stages = nn.Sequential(*[
            FastVitStage(dims[max(i - 1, 0)], dims[i], depths[i], mixers[i], mlp_ratio, se_downsample[i], norm)
            for i in range(len(depths))])
        self.final_conv = MobileOneBlock(dims[-1], 2 * dims[-1], 3, groups=dims[-1], use_se=True)
        self.head = nn.Module()
        self.head.fc = nn.Linear(2 * dims[-1], output_dim)


class FastViT(nn.Module):
    def __init__(self, image_size: int, depths: list[int], dims: list[int], mixers: list[str], output_dim: int,
                 mlp_ratio: float = 3.0, se_downsample: list[bool] | None = None, norm: str = "batch",
                 stem_scale_branch: bool = True):
        super().__init__()
        if len({len(depths), len(dims), len(mixers)}) != 1 or not set(mixers) <= {"repmixer", "attention"} or \
                norm not in ("batch", "layer"):
            raise ValueError(f"FastViT needs one depth, width and mixer ('repmixer' or 'attention') per stage and norm "
                             f"'batch' or 'layer'; got depths {depths}, dims {dims}, mixers {mixers}, norm {norm!r}")
        self.image_size = image_size
        self.output_dim = output_dim
        self.trunk = _Trunk(list(depths), list(dims), list(mixers), mlp_ratio,
                            list(se_downsample or [False] * len(depths)), norm, stem_scale_branch, output_dim)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):  # timm's (its convolutions keep PyTorch's defaults but the MLP's)
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, ConvMlp):
            for conv in (module.fc1, module.fc2):
                nn.init.trunc_normal_(conv.weight, std=0.02)
                nn.init.zeros_(conv.bias)

    def lock_groups(self) -> list:
        """open_clip's lock groups, timm's for FastViT: the stem, each block (a stage's downsampling and position
        encoding with its first), then the final convolution with the head."""
        return trunk_groups(self, FASTVIT_GROUPS)

    def forward_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The map the head pools, ``[N, 2 * dims[-1], H/32, W/32]``. In eval mode the images enter channels-last
        (NHWC in memory), which oneDNN's depthwise and 1x1 convolutions run 1.25-1.35x faster on this CPU, with the
        same results (docs/BENCHMARKS.md); training keeps timm's layout."""
        trunk = self.trunk
        return trunk.final_conv(trunk.stages(trunk.stem(self._input(images))))

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        check_image_batch(images, self.image_size)
        return images if self.training else images.contiguous(memory_format=torch.channels_last)

    def _pool(self, grid: torch.Tensor) -> torch.Tensor:
        """``forward_grid``'s map -> the embedding."""
        return self.trunk.head.fc(grid.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._pool(self.forward_grid(images))

    def forward_intermediates(self, images: torch.Tensor, indices=None, stop_early: bool = False,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NCHW", output_extra_tokens: bool = False) -> dict:
        """open_clip's ``forward_intermediates`` for this tower (timm's trunk's, as open_clip's ``TimmModel`` calls
        it): ``{"image_intermediates": the maps of the stages ``indices`` names (4: None for all, n for the last n, a
        list for those; before the final convolution), "image_features": the embedding (unless
        ``intermediates_only``)}``. FastViT has no final norm nor extra tokens: those flags change nothing."""
        return stage_intermediates(self.trunk.stem(self._input(images)), list(self.trunk.stages),
                                   lambda x: self._pool(self.trunk.final_conv(x)), indices, stop_early,
                                   intermediates_only, output_fmt)
